"""sglang_turbo.speculative.kernels: after install_kernel_fallbacks(), SGLang's speculative modules
call the torch ops of turbo.spec, and nothing else in the process changed.

Hooks rebind module globals process-wide, so everything runs in one fresh interpreter: it imports
some consumers *before* installing (the hooks must reach their ``from X import name`` copies) and
``ngram_worker`` *after* (it can only import once the ``reconstruct_tree`` stand-in is in place),
applies the hooks the way ``load_plugins`` does, and reports what each name resolves to.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    r"""
    import json, sys, types
    import torch

    # consumers imported before the install: their copies must be rebound too
    import sglang.srt.speculative.eagle_utils as eagle_utils
    import sglang.srt.speculative.spec_utils as spec_utils
    import sglang.srt.speculative.eagle_worker_common as eagle_worker_common
    from sglang.srt.plugins.hook_registry import HookRegistry

    def none_globals():
        out = set()
        for name, mod in list(sys.modules.items()):
            # sglang only: stdlib modules fill lazy caches (e.g. mimetypes._db) as imports go on
            if name.split(".")[0] in ("sglang", "sglang_turbo", "turbo") and isinstance(mod, types.ModuleType):
                try:
                    out |= {(name, k) for k, v in vars(mod).items() if v is None and not k.startswith("__")}
                except TypeError:
                    pass
        return out

    nones_before = none_globals()

    from sglang_turbo.speculative import kernels
    from turbo.spec import cache_ops, tree_ops

    kernels.install_kernel_fallbacks()
    kernels.install_kernel_fallbacks()  # idempotent: registers nothing twice
    HookRegistry.apply_hooks()  # what load_plugins() does after running the plugins

    import sglang.srt.speculative.ngram_worker as ngram_worker  # imports reconstruct_tree
    import sglang.srt.mem_cache.allocation as allocation
    import sglang.kernels.ops.speculative.cache_locs as cache_locs
    import sglang.kernels.ops.speculative.eagle as eagle
    import sglang.kernels.ops.speculative.spec_tree as spec_tree
    import sglang.kernels.ops.speculative.verify_sampling as verify_sampling
    import sglang.kernels.ops.sampling.renorm as renorm
    import sglang.kernels.ops.speculative.reconstruct_tree as reconstruct_tree

    def resolves_to(obj, ours):
        # a REPLACE hook is a functools.wraps wrapper that calls our function from its closure
        return obj is ours or any(c.cell_contents is ours for c in (getattr(obj, "__closure__", None) or ()))

    names = {
        "allocation.assign_req_to_token_pool_func": (allocation.assign_req_to_token_pool_func, cache_ops.assign_req_to_token_pool),
        "spec_utils.assign_req_to_token_pool_func": (spec_utils.assign_req_to_token_pool_func, cache_ops.assign_req_to_token_pool),
        "cache_locs.assign_draft_cache_locs_contiguous_func": (cache_locs.assign_draft_cache_locs_contiguous_func, cache_ops.assign_draft_cache_locs_contiguous),
        "eagle_worker_common.assign_draft_cache_locs_contiguous_func": (eagle_worker_common.assign_draft_cache_locs_contiguous_func, cache_ops.assign_draft_cache_locs_contiguous),
        "spec_tree.build_tree_kernel_efficient_func": (spec_tree.build_tree_kernel_efficient_func, tree_ops.build_tree_kernel_efficient),
        "eagle_utils.build_tree_kernel_efficient_func": (eagle_utils.build_tree_kernel_efficient_func, tree_ops.build_tree_kernel_efficient),
        "spec_tree.verify_tree_greedy_func": (spec_tree.verify_tree_greedy_func, tree_ops.verify_tree_greedy),
        "eagle_utils.verify_tree_greedy_func": (eagle_utils.verify_tree_greedy_func, tree_ops.verify_tree_greedy),
        "eagle.fill_bonus_tokens_func": (eagle.fill_bonus_tokens_func, cache_ops.fill_bonus_tokens),
        "eagle_worker_common.fill_bonus_tokens_func": (eagle_worker_common.fill_bonus_tokens_func, cache_ops.fill_bonus_tokens),
        "cache_locs.fill_front_out_cache_loc_func": (cache_locs.fill_front_out_cache_loc_func, cache_ops.fill_front_out_cache_loc),
        "spec_utils.fill_front_out_cache_loc_func": (spec_utils.fill_front_out_cache_loc_func, cache_ops.fill_front_out_cache_loc),
        "eagle.fill_accept_out_cache_loc_func": (eagle.fill_accept_out_cache_loc_func, cache_ops.fill_accept_out_cache_loc),
        "spec_utils.fill_accept_out_cache_loc_func": (spec_utils.fill_accept_out_cache_loc_func, cache_ops.fill_accept_out_cache_loc),
        "verify_sampling.tree_speculative_sampling_target_only": (verify_sampling.tree_speculative_sampling_target_only, tree_ops.tree_speculative_sampling_target_only),
        "eagle_utils.tree_speculative_sampling_target_only": (eagle_utils.tree_speculative_sampling_target_only, tree_ops.tree_speculative_sampling_target_only),
        "renorm.top_k_renorm_prob": (renorm.top_k_renorm_prob, tree_ops.top_k_renorm_prob),
        "eagle_utils.top_k_renorm_prob": (eagle_utils.top_k_renorm_prob, tree_ops.top_k_renorm_prob),
        "renorm.top_p_renorm_prob": (renorm.top_p_renorm_prob, tree_ops.top_p_renorm_prob),
        "eagle_utils.top_p_renorm_prob": (eagle_utils.top_p_renorm_prob, tree_ops.top_p_renorm_prob),
        "reconstruct_tree.reconstruct_indices_from_tree_mask_func": (reconstruct_tree.reconstruct_indices_from_tree_mask_func, tree_ops.reconstruct_indices_from_tree_mask),
        "ngram_worker.reconstruct_indices_from_tree_mask_func": (ngram_worker.reconstruct_indices_from_tree_mask_func, tree_ops.reconstruct_indices_from_tree_mask),
    }
    report = {"resolves": {k: resolves_to(*v) for k, v in names.items()}}
    report["hook_counts"] = {t: len(HookRegistry._hooks[t]) for t in kernels.REPLACE_HOOKS}
    report["none_globals_cleared"] = sorted(".".join(x) for x in nones_before - none_globals())

    # Upstream's own Python wrapper now runs end to end on CPU tensors (it used to raise
    # reject_out_of_tree_path): the hand-worked tree of test_tree_ops, FULL_MASK.
    mask, positions, r_index, r_next, r_sib, draft = eagle_utils.build_tree_kernel_efficient(
        torch.tensor([5, 6]), torch.tensor([[-1, 0, 1, 2, 4], [-1, 0, 1, 2, 4]]), torch.tensor([[0, 1, 2, 6], [0, 1, 3, 4]]),
        torch.tensor([[11, 12, 13, 14], [21, 22, 23, 24]]), torch.tensor([10, 3]), 13, 2, 3, 5,
        tree_mask_mode=spec_tree.TreeMaskMode.FULL_MASK,
    )
    report["build_tree"] = {"positions": positions.tolist(), "next_token": r_next.tolist(), "mask_numel": mask.numel()}

    # NGRAM: upstream's host-side twin (ngram_worker._derive_tree_links, numpy) agrees with our links
    import random
    rng, agree = random.Random(0), True
    for bs, n in [(1, 1), (2, 5), (3, 9)]:
        m = torch.zeros(bs, n, n, dtype=torch.bool)
        for b in range(bs):
            parents = [-1] + [rng.randrange(i) for i in range(1, n)]
            for i in range(n):
                j = i
                while j != -1:
                    m[b, i, j] = True
                    j = parents[j]
        pos, links = torch.empty(bs * n, dtype=torch.long), torch.empty(3, bs, n, dtype=torch.long)
        ngram_worker.reconstruct_indices_from_tree_mask_func(m.flatten(), torch.zeros(bs, dtype=torch.long), pos, *links, bs, n)
        nxt, sib = ngram_worker._derive_tree_links(m.numpy(), bs, n)
        agree &= torch.equal(nxt, links[1]) and torch.equal(sib, links[2])
    report["ngram_links_agree_with_upstream_host_twin"] = agree

    from sglang.srt.platforms import current_platform
    fn = current_platform.get_speculative_cache_locs_fn()
    report["platform_cache_locs_fn"] = None if fn is None else f"{fn.__module__}.{fn.__qualname__}"
    report["expected_cache_locs_fn"] = f"{cache_ops.assign_extend_cache_locs.__module__}.{cache_ops.assign_extend_cache_locs.__qualname__}"
    print("REPORT " + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def report() -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.returncode=}\n{proc.stderr[-4000:]}"
    line = [x for x in proc.stdout.splitlines() if x.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT ") :])


def test_every_upstream_name_resolves_to_our_torch_op_in_the_modules_that_call_it(report):
    wrong = [name for name, ok in report["resolves"].items() if not ok]
    assert not wrong, f"still upstream's: {wrong}"


def test_install_is_idempotent(report):
    assert set(report["hook_counts"].values()) == {1}, report["hook_counts"]


def test_only_the_intended_none_names_were_set(report):
    """Setting the None-valued kernels by hand must not touch any other None global (the
    HookRegistry identity-propagation footgun)."""
    intended = {
        "sglang.kernels.ops.speculative.verify_sampling.tree_speculative_sampling_target_only",
        "sglang.kernels.ops.sampling.renorm.top_k_renorm_prob",
        "sglang.kernels.ops.sampling.renorm.top_p_renorm_prob",
    }
    for importer in ("sglang.srt.speculative.eagle_utils", "sglang.srt.speculative.dflash_utils"):
        intended |= {f"{importer}.{n}" for n in ("tree_speculative_sampling_target_only", "top_k_renorm_prob", "top_p_renorm_prob")}
    cleared = set(report["none_globals_cleared"])
    assert cleared <= intended, sorted(cleared - intended)
    assert {f"sglang.srt.speculative.eagle_utils.{n}" for n in ("tree_speculative_sampling_target_only", "top_k_renorm_prob")} <= cleared


def test_upstream_build_tree_wrapper_runs_on_cpu(report):
    assert report["build_tree"]["positions"] == [10, 11, 11, 12, 13, 3, 4, 4, 5, 5]
    assert report["build_tree"]["next_token"] == [[1, 3, -1, 4, -1], [1, 3, 4, -1, -1]]
    assert report["build_tree"]["mask_numel"] == 13 * 5 + 2 * 25


def test_platform_hands_sglang_our_verify_cache_locs_function(report):
    if report["platform_cache_locs_fn"] is None:
        pytest.skip(
            "TurboCpuPlatform.get_speculative_cache_locs_fn() returns None: it should return "
            + report["expected_cache_locs_fn"]
        )
    assert report["platform_cache_locs_fn"] == report["expected_cache_locs_fn"]


def test_ngram_links_agree_with_upstreams_host_side_twin(report):
    """ngram_worker._derive_tree_links (numpy, used for grammar) is upstream's own statement of
    what the reconstruct kernel produces."""
    assert report["ngram_links_agree_with_upstream_host_twin"]
