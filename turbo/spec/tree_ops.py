"""Draft-tree ops of speculative decoding, in plain PyTorch.

A verify round scores ``n = num_draft_tokens`` tokens per request at once: node 0 is the
last committed token (the root), nodes 1..n-1 are draft tokens arranged in a tree.
SGLang describes the tree three ways, and these ops build and consume them:

- ``tree_mask``: node i may attend to node j iff j is i itself, the root, or an ancestor;
- ``positions[b * n + i] = seq_len[b] + depth(i)``;
- retrieve links, (bs, n) int64: ``retrieve_index[b, i] = b * n + i`` (the node's row in the
  flattened batch), ``retrieve_next_token[b, i]`` = first child of i, ``retrieve_next_sibling[b, i]``
  = the next child of i's parent, -1 where there is none. The verifiers walk these links.

Each op has the signature and in-place contract of the SGLang function named in its docstring,
and sits beside ``<op>_ref``: a per-request Python loop written from upstream's definition.
"""

from __future__ import annotations

import torch

__all__ = [
    "FULL_MASK",
    "QLEN_ONLY",
    "QLEN_ONLY_BITPACKING",
    "build_tree_kernel_efficient",
    "build_tree_kernel_efficient_ref",
    "verify_tree_greedy",
    "verify_tree_greedy_ref",
    "tree_speculative_sampling_target_only",
    "tree_speculative_sampling_target_only_ref",
    "top_k_renorm_prob",
    "top_k_renorm_prob_ref",
    "top_p_renorm_prob",
    "top_p_renorm_prob_ref",
    "reconstruct_indices_from_tree_mask",
    "reconstruct_indices_from_tree_mask_ref",
]

# Values of upstream's ``TreeMaskMode`` (an IntEnum, so its members compare equal to these).
FULL_MASK, QLEN_ONLY, QLEN_ONLY_BITPACKING = 0, 1, 2


def packed_mask_bytes(num_draft_tokens: int) -> int:
    """Bytes per row of a QLEN_ONLY_BITPACKING mask: 1, 2 or 4 (up to 32 nodes), as upstream sizes it."""
    if num_draft_tokens > 32:
        raise ValueError(f"QLEN_ONLY_BITPACKING holds at most 32 draft tokens, got {num_draft_tokens}")
    return 4 if num_draft_tokens > 16 else 2 if num_draft_tokens > 8 else 1


# ---------------------------------------------------------------------------------------------
# EAGLE tree construction


def _eagle_parents(parent_list: torch.Tensor, top_scores_index: torch.Tensor, topk: int, n: int) -> torch.Tensor:
    """(bs, n) parent node of every node; root -> -1, a node whose parent was not selected -> n.

    Node i >= 1 is the draft whose score index is ``s = top_scores_index[b, i-1]``. ``s // topk``
    indexes ``parent_list``: 0 means a child of the root, otherwise ``parent_list[b, s // topk]`` is
    the parent's score index, and the parent node is 1 + the first place it occurs in
    ``top_scores_index``.
    """
    bs = top_scores_index.shape[0]
    root = torch.full((bs, 1), -1, dtype=torch.int64, device=top_scores_index.device)
    if n == 1:  # no drafts: the tree is its root
        return root
    sel = top_scores_index.to(torch.int64)
    group = sel // topk
    if parent_list.shape[1] > 0:
        parent_score = parent_list.to(torch.int64).gather(1, group.clamp(max=parent_list.shape[1] - 1))
    else:  # one draft step: every node hangs off the root
        parent_score = torch.full_like(sel, -1)
    match = sel[:, None, :] == parent_score[:, :, None]  # (bs, node-1, candidate parent-1)
    found = match.any(-1)
    first = match.to(torch.int8).argmax(-1) + 1  # argmax returns the first maximum
    parents = torch.where(group == 0, 0, torch.where(found, first, n))
    return torch.cat([root, parents], 1)


def _ancestors(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bs, n, n) bool ``anc[b, i, j]``: j is i or one of i's ancestors below the root; and depth(i).

    Walks every node up at once, one tree level per iteration; a walk stops at the root's child
    or at a missing parent (as the XPU Triton twin does), so a broken tree cannot loop.
    """
    bs, n = parents.shape
    node = torch.arange(n, device=parents.device).expand(bs, n).clone()
    active = node > 0
    anc = torch.zeros(bs, n, n, dtype=torch.bool, device=parents.device)
    depth = torch.zeros(bs, n, dtype=torch.int64, device=parents.device)
    cols = torch.arange(n, device=parents.device)
    for _ in range(n):
        if not bool(active.any()):
            break
        anc |= (node[..., None] == cols) & active[..., None]
        depth += active
        up = parents.gather(1, node)
        active &= (up > 0) & (up < n)
        node = torch.where(active, up, node)
    return anc, depth


def _links_from_parents(parents: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First child and next sibling (smallest larger index with the same parent), -1 for none.

    Only nodes with ``valid`` set take part, as children or siblings.
    """
    bs, n = parents.shape
    idx = torch.arange(n, device=parents.device)
    big = torch.full((), n, device=parents.device)
    is_child = valid[:, None, :] & (parents[:, None, :] == idx[None, :, None])  # [b, p, i]: i is a child of p
    first_child = torch.where(is_child, idx, big).amin(-1)
    same = valid[:, :, None] & valid[:, None, :] & (parents[:, :, None] == parents[:, None, :])
    same &= idx[None, :] > idx[:, None]  # [b, i, k]: k is a later sibling of i
    next_sib = torch.where(same, idx, big).amin(-1)
    return torch.where(first_child < n, first_child, -1), torch.where(next_sib < n, next_sib, -1)


def build_tree_kernel_efficient(
    parent_list: torch.Tensor,
    top_scores_index: torch.Tensor,
    seq_lens: torch.Tensor,
    tree_mask: torch.Tensor,
    positions: torch.Tensor,
    retrieve_index: torch.Tensor,
    retrieve_next_token: torch.Tensor,
    retrieve_next_sibling: torch.Tensor,
    topk: int,
    spec_steps: int,
    num_verify_tokens: int,
    tree_mask_mode: int,
) -> None:
    """Stand-in for ``sglang.kernels.ops.speculative.spec_tree.build_tree_kernel_efficient_func``.

    Inputs: ``parent_list`` (bs, topk*(spec_steps-1)+1) and ``top_scores_index`` (bs, n-1, sorted)
    from ``organize_draft_results``; ``seq_lens`` (bs,). All outputs are written in place:

    - ``positions`` (bs*n,): ``seq_len + depth``;
    - ``retrieve_index`` (bs, n): ``b*n + i``;
    - ``retrieve_next_token[b, p]``: smallest child of p, written only where p has a child;
      ``retrieve_next_sibling[b, i]``: next larger sibling, written only where there is one
      (the caller pre-fills both with -1; a node whose parent was not selected gets no link);
    - ``tree_mask``, read as raw bytes whatever its dtype, in one of upstream's layouts:
      FULL_MASK: per request ``n x (seq_len + n)`` rows, requests back to back; only the last n
      columns of each row are written (the prefix columns are the caller's fill, True);
      QLEN_ONLY: ``n x n`` per request; QLEN_ONLY_BITPACKING: per row ``packed_mask_bytes(n)``
      little-endian bytes, bit j = column j; byte 0 is assigned, later bytes are OR-ed into the
      (caller-zeroed) buffer, as the CUDA kernel does.

    Row i lets node i see the root (column 0), itself and its ancestors. ``spec_steps`` only tells
    a chain (topk 1, a node per step) from a tree; a valid tree's walk below stops by itself.
    """
    n = num_verify_tokens
    bs = seq_lens.shape[0]
    if bs == 0:
        return
    device = seq_lens.device
    seq = seq_lens.to(torch.int64)
    if topk == 1 and n - 1 == spec_steps:
        # Every drafted token verified, one per step: the chain root -> 1 -> ... -> n-1, whatever the
        # scores. Written directly: between two forwards each small op costs ~20 us on the CPU.
        depth = torch.arange(n, device=device)  # the same for every request
        retrieve_next_token[:bs, : n - 1] = depth[1:]
        rows = torch.ones(n, n, dtype=torch.bool, device=device).tril().expand(bs, n, n)
    else:
        parents = _eagle_parents(parent_list, top_scores_index, topk, n)
        anc, depth = _ancestors(parents)
        valid = (parents >= 0) & (parents < n)
        first_child, next_sib = _links_from_parents(parents, valid)
        has_child = first_child >= 0
        retrieve_next_token[:bs][has_child] = first_child[has_child]
        has_sib = next_sib >= 0
        retrieve_next_sibling[:bs][has_sib] = next_sib[has_sib]
        rows = anc.clone()
        rows[:, :, 0] = True  # every node sees the root

    positions.view(-1)[: bs * n] = (seq[:, None] + depth).reshape(-1)
    retrieve_index[:bs] = torch.arange(bs * n, device=device).view(bs, n)
    _write_tree_mask(tree_mask, rows, seq, tree_mask_mode)


def _write_tree_mask(tree_mask: torch.Tensor, rows: torch.Tensor, seq: torch.Tensor, mode: int) -> None:
    """Store the (bs, n, n) visibility ``rows`` into ``tree_mask`` in layout ``mode`` (see above)."""
    bs, n, _ = rows.shape
    device = rows.device
    raw = tree_mask.view(-1).view(torch.uint8)
    i = torch.arange(n, device=device)
    if mode == FULL_MASK:
        # request b's block starts after the blocks of the requests before it: n * (seq_len + n) each
        start = n * (torch.cumsum(seq, 0) - seq) + n * n * torch.arange(bs, device=device)
        idx = start[:, None, None] + (seq[:, None, None] + n) * i[None, :, None] + seq[:, None, None] + i[None, None, :]
        raw[idx] = rows.to(torch.uint8)
    elif mode == QLEN_ONLY:
        raw[: bs * n * n] = rows.reshape(-1).to(torch.uint8)
    elif mode == QLEN_ONLY_BITPACKING:
        nb = packed_mask_bytes(n)
        weights = torch.zeros(n, nb, dtype=torch.int32, device=device)
        weights[i, i // 8] = (1 << (i % 8)).to(torch.int32)
        packed = (rows.to(torch.int32).reshape(bs * n, n) @ weights).to(torch.uint8)  # (bs*n, nb)
        view = raw[: bs * n * nb].view(bs * n, nb)
        view[:, 0] = packed[:, 0]
        if nb > 1:
            view[:, 1:] |= packed[:, 1:]
    else:
        raise ValueError(f"unknown tree mask mode {mode!r}")


def build_tree_kernel_efficient_ref(
    parent_list,
    top_scores_index,
    seq_lens,
    tree_mask,
    positions,
    retrieve_index,
    retrieve_next_token,
    retrieve_next_sibling,
    topk,
    spec_steps,
    num_verify_tokens,
    tree_mask_mode,
):
    n = num_verify_tokens
    raw = tree_mask.view(-1).view(torch.uint8)
    block = 0  # FULL_MASK: start of request b's rows
    for b in range(seq_lens.shape[0]):
        sel = [int(x) for x in top_scores_index[b]]
        seq_len = int(seq_lens[b])

        def parent_of(i):  # node -> parent node, None when the parent was not selected
            g = sel[i - 1] // topk
            if g == 0:
                return 0
            score = int(parent_list[b, g])
            return sel.index(score) + 1 if score in sel else None

        # links: children in descending order, each pushed in front of its parent's list
        for i in range(n - 1, 0, -1):
            retrieve_index[b, i] = b * n + i
            p = parent_of(i)
            if p is None:
                continue
            if int(retrieve_next_token[b, p]) != -1:
                retrieve_next_sibling[b, i] = retrieve_next_token[b, p]
            retrieve_next_token[b, p] = i
        retrieve_index[b, 0] = b * n

        for i in range(n):
            seen = {0}
            node, depth = i, 0
            while node not in (0, None):
                seen.add(node)
                depth += 1
                node = parent_of(node)
            positions.view(-1)[b * n + i] = seq_len + depth
            for j in range(n):
                bit = j in seen
                if tree_mask_mode == FULL_MASK:
                    raw[block + (seq_len + n) * i + seq_len + j] = bit
                elif tree_mask_mode == QLEN_ONLY:
                    raw[b * n * n + i * n + j] = bit
                else:
                    nb = packed_mask_bytes(n)
                    at = (b * n + i) * nb + j // 8
                    if j == 0:
                        raw[at] = 1
                    elif bit:
                        raw[at] |= 1 << (j % 8)
        block += n * (seq_len + n)


# ---------------------------------------------------------------------------------------------
# Verification: walking the tree


def _child_lists(next_token: torch.Tensor, next_sibling: torch.Tensor) -> torch.Tensor:
    """(bs, n, W) children of every node in link order (first child, then its next siblings), -1 padded.

    One iteration per sibling rank, all nodes at once; W is the widest fan-out (at most n).
    """
    bs, n = next_token.shape
    ptr = next_token.to(torch.int64)
    cols = []
    for _ in range(n):
        live = ptr >= 0
        if not bool(live.any()):
            break
        cols.append(ptr)
        ptr = torch.where(live, next_sibling.to(torch.int64).gather(1, ptr.clamp(min=0).view(bs, -1)).view(bs, n), -1)
    if not cols:
        return torch.full((bs, n, 1), -1, dtype=torch.int64, device=next_token.device)
    return torch.stack(cols, -1)


def verify_tree_greedy(
    predicts: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    candidates: torch.Tensor,
    retrieve_index: torch.Tensor,
    retrieve_next_token: torch.Tensor,
    retrieve_next_sibling: torch.Tensor,
    target_predict: torch.Tensor,
    topk: int = -1,
):
    """Stand-in for ``sglang.kernels.ops.speculative.spec_tree.verify_tree_greedy_func``.

    From the root, repeatedly step to the first child (in link order) whose draft token equals the
    target's argmax at the current node, at most ``accept_index.shape[1] - 1`` times. In place:
    ``accept_index[b, 0..m]`` = retrieve indices of root and the m accepted nodes (entries after m
    are left as they were: the caller's -1), ``accept_token_num[b] = m``, and
    ``predicts[x] = target_predict.flat[x]`` for every x on the accepted path (x = retrieve index:
    each accepted node's token and then the bonus token). Other ``predicts`` entries are untouched.
    ``topk == 1`` (upstream's ``tree_topk`` of an EAGLE chain) takes :func:`_verify_chain_greedy`; other
    values (-1: an irregular tree, NGRAM's) walk the links. Returns the three written tensors.
    """
    bs, n = candidates.shape
    depth_cap = accept_index.shape[1]
    if bs == 0:
        return predicts, accept_index, accept_token_num
    device = candidates.device
    if topk == 1:
        return _verify_chain_greedy(predicts, accept_index, accept_token_num, candidates, retrieve_index[:bs],
                                    target_predict)
    rows = torch.arange(bs, device=device)
    retrieve_index = retrieve_index[:bs]
    kids = _child_lists(retrieve_next_token[:bs], retrieve_next_sibling[:bs])
    target_flat = target_predict.reshape(-1).to(torch.int64)

    cur = torch.zeros(bs, dtype=torch.int64, device=device)  # local node
    last = retrieve_index[:, 0].to(torch.int64)  # its retrieve index
    accept_index[:, 0] = last.to(accept_index.dtype)
    num = torch.zeros(bs, dtype=torch.int64, device=device)
    alive = torch.ones(bs, dtype=torch.bool, device=device)
    for j in range(1, depth_cap):
        options = kids[rows, cur]  # (bs, W)
        want = target_flat[last]
        hit = (options >= 0) & (candidates.gather(1, options.clamp(min=0)) == want[:, None]) & alive[:, None]
        alive = hit.any(1)
        if not bool(alive.any()):
            break
        pick = options[rows, hit.to(torch.int8).argmax(1)]
        chosen = retrieve_index.gather(1, pick.clamp(min=0)[:, None]).squeeze(1).to(torch.int64)
        predicts[last[alive]] = want[alive].to(predicts.dtype)
        accept_index[rows[alive], j] = chosen[alive].to(accept_index.dtype)
        num += alive
        cur = torch.where(alive, pick, cur)
        last = torch.where(alive, chosen, last)
    accept_token_num[:bs] = num.to(accept_token_num.dtype)
    predicts[last] = target_flat[last].to(predicts.dtype)
    return predicts, accept_index, accept_token_num


def _verify_chain_greedy(predicts, accept_index, accept_token_num, candidates, retrieve_index, target_predict):
    """:func:`verify_tree_greedy` of a chain (node j's only child is j + 1: EAGLE with topk 1), without
    the walk: the accepted drafts are the longest prefix on which draft j equals the target's argmax at
    node j - 1. A handful of ops whatever the depth: between two forwards each small op costs ~20 us on
    the CPU, and the walk takes ~12 per step. A topk-1 tree is always this chain: upstream sets
    num_draft_tokens = num_steps + 1 when topk is 1 (arg_groups/speculative_hook.py)."""
    bs, n = candidates.shape
    depth = min(n, accept_index.shape[1])
    chain = retrieve_index[:, :depth].to(torch.int64)  # (bs, depth) retrieve index of each chain node
    target = target_predict.reshape(-1).to(torch.int64)[chain]  # the target's argmax at each node
    agree = candidates[:, 1:depth].to(torch.int64) == target[:, : depth - 1]
    num = agree.to(torch.int64).cumprod(1).sum(1)  # (bs,) accepted drafts
    on_path = torch.arange(depth, device=chain.device) <= num[:, None]  # the root and the accepted nodes
    kept = accept_index[:, :depth].to(torch.int64)  # the caller's entries past the accepted nodes
    accept_index[:, :depth] = torch.where(on_path, chain, kept).to(accept_index.dtype)
    predicts[chain[on_path]] = target[on_path].to(predicts.dtype)
    accept_token_num[:bs] = num.to(accept_token_num.dtype)
    return predicts, accept_index, accept_token_num


def verify_tree_greedy_ref(
    predicts,
    accept_index,
    accept_token_num,
    candidates,
    retrieve_index,
    retrieve_next_token,
    retrieve_next_sibling,
    target_predict,
    topk=-1,
):
    bs, n = candidates.shape
    tp = target_predict.reshape(-1)
    for b in range(bs):
        last = int(retrieve_index[b, 0])
        accept_index[b, 0] = last
        num, cur = 0, 0
        for j in range(1, accept_index.shape[1]):
            child = int(retrieve_next_token[b, cur])
            while child != -1 and int(candidates[b, child]) != int(tp[last]):
                child = int(retrieve_next_sibling[b, child])
            if child == -1:
                break
            predicts[last] = tp[last]
            num += 1
            last = int(retrieve_index[b, child])
            accept_index[b, num] = last
            cur = child
        accept_token_num[b] = num
        predicts[last] = tp[last]
    return predicts, accept_index, accept_token_num


# ---------------------------------------------------------------------------------------------
# Verification: speculative sampling


def _sample_residual(residual: torch.Tensor, coin: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample of each row of an unnormalised ``residual`` with uniform ``coin`` in [0, 1).

    First index whose running sum exceeds ``coin * total``; if rounding leaves none, the last
    index with mass, and the last index when the row has no mass (FlashInfer's rule).
    """
    d = residual.shape[-1]
    cdf = torch.cumsum(residual, -1)
    u = coin * residual.sum(-1)
    idx = (cdf <= u[:, None]).sum(-1)
    has_mass = residual > 0
    last_valid = torch.where(has_mass.any(-1), d - 1 - has_mass.flip(-1).to(torch.int8).argmax(-1), d - 1)
    return torch.where(idx < d, idx, last_valid)


def tree_speculative_sampling_target_only(
    predicts: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    uniform_samples: torch.Tensor,
    uniform_samples_for_final_sampling: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    threshold_single: float = 1.0,
    threshold_acc: float = 1.0,
    deterministic: bool = True,
) -> None:
    """Stand-in for upstream's ``tree_speculative_sampling_target_only`` (JIT CUDA on CUDA, None here).

    Speculative sampling with one-hot draft probabilities: at the current node c (target
    distribution ``p = target_probs[b, c]``, coin ``u = uniform_samples[b, c]``), children are tried
    in link order with a running sum ``acc += p(token)``; child t is accepted when ``p(t) > 0`` and
    ``u < acc / threshold_acc`` (or ``p(t) >= threshold_single``). So with thresholds 1 the accepted
    child is t with probability exactly p(t). A rejected child's token gets
    ``draft_probs[b, c, token] = p(token)``. When no child is accepted (or the depth cap
    ``accept_index.shape[1] - 1`` is reached) the last token is drawn with
    ``uniform_samples_for_final_sampling[b]`` from ``relu(p - draft_probs[b, c])`` renormalised,
    i.e. from p with the rejected drafts removed (from p itself after a capped run): so every
    emitted token follows the target distribution.

    Outputs in place, as the greedy verifier: ``accept_index`` rows, ``accept_token_num``,
    ``predicts[x]`` = accepted draft token at each accepted-path node x, then the sampled token at
    the last one; also ``draft_probs`` entries of rejected tokens. ``deterministic`` only picks a
    CUDA reduction order; it does not change the result here.
    """
    del deterministic
    bs, n = candidates.shape
    depth_cap = accept_index.shape[1]
    if bs == 0:
        return
    device = candidates.device
    rows = torch.arange(bs, device=device)
    retrive_index = retrive_index[:bs]
    kids = _child_lists(retrive_next_token[:bs], retrive_next_sibling[:bs])
    thr_acc = max(float(threshold_acc), 1e-9)

    cur = torch.zeros(bs, dtype=torch.int64, device=device)
    last = retrive_index[:, 0].to(torch.int64)
    accept_index[:, 0] = last.to(accept_index.dtype)
    num = torch.zeros(bs, dtype=torch.int64, device=device)
    alive = torch.ones(bs, dtype=torch.bool, device=device)
    for j in range(1, depth_cap):
        options = kids[rows, cur]  # (bs, W), -1 padded
        live = (options >= 0) & alive[:, None]
        tokens = candidates.gather(1, options.clamp(min=0)).to(torch.int64)
        tokens = torch.where(live, tokens, 0)  # padding reads token 0, always inside the vocabulary
        p = target_probs[rows[:, None], cur[:, None], tokens]  # (bs, W)
        p = torch.where(live, p, torch.zeros((), dtype=p.dtype, device=device))
        acc = torch.cumsum(p, 1)
        coin = uniform_samples[rows, cur]
        ok = live & (p > 0) & ((coin[:, None] < acc / thr_acc) | (p >= threshold_single))
        accepted = ok.any(1)
        first = torch.where(accepted, ok.to(torch.int8).argmax(1), live.sum(1))  # children tried before stopping
        tried_and_rejected = live & (torch.arange(options.shape[1], device=device)[None, :] < first[:, None])
        if bool(tried_and_rejected.any()):
            r, w = tried_and_rejected.nonzero(as_tuple=True)
            draft_probs[r, cur[r], tokens[r, w]] = p[r, w].to(draft_probs.dtype)
        alive = accepted
        if not bool(alive.any()):
            break
        pick = options[rows, first.clamp(max=options.shape[1] - 1)]
        chosen = retrive_index.gather(1, pick.clamp(min=0)[:, None]).squeeze(1).to(torch.int64)
        predicts[last[alive]] = tokens[rows, first.clamp(max=options.shape[1] - 1)][alive].to(predicts.dtype)
        accept_index[rows[alive], j] = chosen[alive].to(accept_index.dtype)
        num += alive
        cur = torch.where(alive, pick, cur)
        last = torch.where(alive, chosen, last)
    accept_token_num[:bs] = num.to(accept_token_num.dtype)

    q = target_probs[rows, cur]  # (bs, vocab)
    capped = num == depth_cap - 1  # no draft distribution at the bonus position
    d_at = torch.where(capped[:, None], torch.zeros((), dtype=draft_probs.dtype, device=device), draft_probs[rows, cur])
    residual = (q - d_at.to(q.dtype)).clamp(min=0)
    sampled = _sample_residual(residual, uniform_samples_for_final_sampling[:bs].to(residual.dtype))
    predicts[last] = sampled.to(predicts.dtype)


def tree_speculative_sampling_target_only_ref(
    predicts,
    accept_index,
    accept_token_num,
    candidates,
    retrive_index,
    retrive_next_token,
    retrive_next_sibling,
    uniform_samples,
    uniform_samples_for_final_sampling,
    target_probs,
    draft_probs,
    threshold_single=1.0,
    threshold_acc=1.0,
    deterministic=True,
):
    bs, n = candidates.shape
    spec = accept_index.shape[1]
    thr_acc = max(float(threshold_acc), 1e-9)
    for b in range(bs):
        last = int(retrive_index[b, 0])
        accept_index[b, 0] = last
        num, cur = 0, 0
        for j in range(1, spec):
            acc = torch.zeros((), dtype=target_probs.dtype)
            coin = uniform_samples[b, cur]
            child = int(retrive_next_token[b, cur])
            while child != -1:
                tok = int(candidates[b, child])
                p = target_probs[b, cur, tok]
                acc = acc + p
                if p > 0 and (coin < acc / thr_acc or p >= threshold_single):
                    break
                draft_probs[b, cur, tok] = p
                child = int(retrive_next_sibling[b, child])
            if child == -1:
                break
            predicts[last] = int(candidates[b, child])
            num += 1
            last = int(retrive_index[b, child])
            accept_index[b, num] = last
            cur = child
        accept_token_num[b] = num
        q = target_probs[b, cur]
        residual = q if num == spec - 1 else (q - draft_probs[b, cur]).clamp(min=0)
        u = uniform_samples_for_final_sampling[b] * residual.sum()
        running = torch.zeros((), dtype=residual.dtype)
        sampled = None
        for t in range(residual.numel()):
            running = running + residual[t]
            if residual[t] > 0 and running > u:
                sampled = t
                break
        if sampled is None:
            positive = [t for t in range(residual.numel()) if residual[t] > 0]
            sampled = positive[-1] if positive else residual.numel() - 1
        predicts[last] = sampled


def _per_row(value, rows: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A scalar, a one-element tensor or a per-row tensor, as ``rows`` values."""
    t = torch.as_tensor(value).to(device=device, dtype=dtype).reshape(-1)
    if t.numel() == 1:
        return t.expand(rows)
    if t.numel() != rows:
        raise ValueError(f"expected one value or {rows}, got {t.numel()}")
    return t


def top_k_renorm_prob(probs: torch.Tensor, top_k) -> torch.Tensor:
    """Stand-in for ``sglang.kernels.ops.sampling.renorm.top_k_renorm_prob`` (FlashInfer's ``top_k_renorm_probs``).

    Per row keep every probability >= the k-th largest (ties at the pivot all stay; k >= vocab
    keeps the row), zero the rest, renormalise. ``top_k``: int, or a tensor with one value per row
    (or a single value). Returns a new float32 tensor.
    """
    probs = probs.float()
    bs, vocab = probs.shape
    if bs == 0 or vocab == 0:
        return probs.clone()
    ks = _per_row(top_k, bs, torch.int64, probs.device)
    ordered = torch.sort(probs, -1, descending=True).values
    pivot = ordered.gather(1, (ks - 1).clamp(0, vocab - 1)[:, None])
    kept = torch.where(probs >= pivot, probs, torch.zeros((), device=probs.device))
    return kept / kept.sum(-1, keepdim=True)


def top_k_renorm_prob_ref(probs, top_k):
    out = torch.zeros_like(probs, dtype=torch.float32)
    ks = torch.as_tensor(top_k).reshape(-1).tolist()
    ks = ks * probs.shape[0] if len(ks) == 1 else ks
    for b in range(probs.shape[0]):
        row = probs[b].float()
        k = min(max(ks[b], 1), row.numel())
        pivot = sorted(row.tolist(), reverse=True)[k - 1]
        keep = torch.tensor([x >= pivot for x in row.tolist()])
        out[b] = torch.where(keep, row, 0.0) / row[keep].sum()
    return out


def top_p_renorm_prob(probs: torch.Tensor, top_p) -> torch.Tensor:
    """Stand-in for ``sglang.kernels.ops.sampling.renorm.top_p_renorm_prob`` (FlashInfer's ``top_p_renorm_probs``).

    Per row keep the most likely tokens whose mass reaches ``top_p``: sorting ascending, drop the
    longest prefix whose running sum stays below ``1 - top_p``; everything >= the first kept value
    stays (ties included). Renormalise. ``top_p``: float, or a tensor with one value per row (or a
    single value). Returns a new float32 tensor.
    """
    probs = probs.float()
    bs, vocab = probs.shape
    if bs == 0 or vocab == 0:
        return probs.clone()
    ps = _per_row(top_p, bs, torch.float32, probs.device)
    ordered = torch.sort(probs, -1).values
    cdf = torch.cumsum(ordered, -1)
    cut = torch.searchsorted(cdf, (1.0 - ps)[:, None], right=False).clamp(max=vocab - 1)
    pivot = ordered.gather(1, cut)
    kept = torch.where(probs >= pivot, probs, torch.zeros((), device=probs.device))
    return kept / kept.sum(-1, keepdim=True)


def top_p_renorm_prob_ref(probs, top_p):
    out = torch.zeros_like(probs, dtype=torch.float32)
    ps = torch.as_tensor(top_p, dtype=torch.float32).reshape(-1).tolist()
    ps = ps * probs.shape[0] if len(ps) == 1 else ps
    for b in range(probs.shape[0]):
        row = probs[b].float()
        p = ps[b]
        ordered = torch.sort(row).values
        cdf = torch.cumsum(ordered, 0)  # the same float32 running sums the op compares
        threshold = torch.tensor(1.0 - p, dtype=torch.float32)
        cut = next((i for i in range(row.numel()) if cdf[i] >= threshold), row.numel() - 1)
        pivot = ordered[cut]
        keep = row >= pivot
        out[b] = torch.where(keep, row, 0.0) / row[keep].sum()
    return out


# ---------------------------------------------------------------------------------------------
# NGRAM: links from a mask


def reconstruct_indices_from_tree_mask(
    tree_mask: torch.Tensor,
    verified_seq_len: torch.Tensor,
    positions: torch.Tensor,
    retrieve_index: torch.Tensor,
    retrieve_next_token: torch.Tensor,
    retrieve_next_sibling: torch.Tensor,
    batch_size: int,
    draft_token_num: int,
) -> None:
    """Stand-in for ``reconstruct_indices_from_tree_mask_func`` (``sglang.kernels.ops.speculative.reconstruct_tree``).

    ``tree_mask`` is the NGRAM corpus' ``(bs, n, n)`` row-major 1-byte mask (flat); only its strictly
    lower triangle is read: ``anc[i, j] = mask[i, j] & (j < i)``. Writes in place, every entry of
    the first ``batch_size`` requests:
    ``positions[b*n + i] = verified_seq_len[b] + #anc[i]``; ``retrieve_index[b, i] = b*n + i``;
    parent(i) = largest j with anc[i, j] (else none); ``retrieve_next_token[b, i]`` = smallest
    k > i with anc[k, i] (its first descendant, i.e. first child in a tree), else -1;
    ``retrieve_next_sibling[b, i]`` = smallest k > i with parent(k) == parent(i), -1 if none or
    if i has no parent.
    """
    bs, n = batch_size, draft_token_num
    if bs == 0:
        return
    device = verified_seq_len.device
    m = tree_mask.reshape(-1)[: bs * n * n].view(bs, n, n) != 0
    idx = torch.arange(n, device=device)
    big = torch.full((), n, device=device)
    anc = m & (idx[None, :] < idx[:, None])  # [b, i, j]

    depth = anc.sum(-1)
    positions.view(-1)[: bs * n] = (verified_seq_len[:bs].to(torch.int64)[:, None] + depth).reshape(-1)
    retrieve_index[:bs] = torch.arange(bs * n, device=device).view(bs, n)

    first_desc = torch.where(anc, idx[None, :, None], big).amin(1)  # over rows k, per column i
    retrieve_next_token[:bs] = torch.where(first_desc < n, first_desc, -1)

    parent = torch.where(anc, idx, torch.full((), -1, device=device)).amax(-1)  # (bs, n)
    same = (parent[:, :, None] == parent[:, None, :]) & (idx[None, :] > idx[:, None])  # [b, i, k]
    next_sib = torch.where(same, idx, big).amin(-1)
    retrieve_next_sibling[:bs] = torch.where((parent >= 0) & (next_sib < n), next_sib, -1)


def reconstruct_indices_from_tree_mask_ref(
    tree_mask,
    verified_seq_len,
    positions,
    retrieve_index,
    retrieve_next_token,
    retrieve_next_sibling,
    batch_size,
    draft_token_num,
):
    n = draft_token_num
    flat = tree_mask.reshape(-1)
    for b in range(batch_size):
        def m(i, j):
            return bool(flat[b * n * n + i * n + j])

        for tid in range(n):
            ancestors = [j for j in range(tid) if m(tid, j)]
            parent = max(ancestors) if ancestors else -1
            retrieve_index[b, tid] = b * n + tid
            positions.view(-1)[b * n + tid] = int(verified_seq_len[b]) + len(ancestors)
            retrieve_next_token[b, tid] = next((k for k in range(tid + 1, n) if m(k, tid)), -1)
            sibling = -1
            if parent != -1:
                for k in range(tid + 1, n):  # k's nearest ancestor is tid's parent
                    if m(k, parent) and not any(m(k, j) for j in range(parent + 1, k)):
                        sibling = k
                        break
            retrieve_next_sibling[b, tid] = sibling
