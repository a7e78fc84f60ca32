"""Swap the Triton / CUDA / sgl_kernel ops on SGLang's speculative paths for plain PyTorch.

On the portable platform every ``is_cuda()/is_cpu()/is_xpu()`` in SGLang is False, so these
functions land in a Triton launch on CPU tensors, a ``reject_out_of_tree_path`` error, or are
``None`` (docs/speculative.md, rows C2-C15, T5-T7, N3-N5). :func:`install_kernel_fallbacks` puts
the ops of :mod:`turbo.spec` in their place without editing SGLang:

| upstream name | ours | seam |
| --- | --- | --- |
| ``sglang.srt.mem_cache.allocation.assign_req_to_token_pool_func`` | ``cache_ops.assign_req_to_token_pool`` | HookRegistry REPLACE |
| ``sglang.kernels.ops.speculative.cache_locs.assign_draft_cache_locs_contiguous_func`` | ``cache_ops.assign_draft_cache_locs_contiguous`` | HookRegistry REPLACE |
| ``sglang.kernels.ops.speculative.spec_tree.build_tree_kernel_efficient_func`` | ``tree_ops.build_tree_kernel_efficient`` | HookRegistry REPLACE |
| ``sglang.kernels.ops.speculative.spec_tree.verify_tree_greedy_func`` | ``tree_ops.verify_tree_greedy`` | HookRegistry REPLACE |
| ``sglang.kernels.ops.speculative.eagle.fill_bonus_tokens_func`` | ``cache_ops.fill_bonus_tokens`` | HookRegistry REPLACE |
| ``sglang.kernels.ops.speculative.cache_locs.fill_front_out_cache_loc_func`` | ``cache_ops.fill_front_out_cache_loc`` | HookRegistry REPLACE |
| ``sglang.kernels.ops.speculative.eagle.fill_accept_out_cache_loc_func`` | ``cache_ops.fill_accept_out_cache_loc`` | HookRegistry REPLACE |
| ``sglang.kernels.ops.speculative.verify_sampling.tree_speculative_sampling_target_only`` (None here) | ``tree_ops.tree_speculative_sampling_target_only`` | setattr on the module and its importers |
| ``sglang.kernels.ops.sampling.renorm.top_k_renorm_prob`` (None here) | ``tree_ops.top_k_renorm_prob`` | setattr on the module and its importers |
| ``sglang.kernels.ops.sampling.renorm.top_p_renorm_prob`` (None here) | ``tree_ops.top_p_renorm_prob`` | setattr on the module and its importers |
| ``sglang.kernels.ops.speculative.reconstruct_tree.reconstruct_indices_from_tree_mask_func`` (module cannot import: sgl_kernel) | ``tree_ops.reconstruct_indices_from_tree_mask`` | stand-in module in ``sys.modules`` |
| ``SRTPlatform.get_speculative_cache_locs_fn()`` (used by ``cache_locs.assign_extend_cache_locs_func``) | ``cache_ops.assign_extend_cache_locs`` | platform method (``TurboCpuPlatform``) |

Why two kinds of seam. HookRegistry REPLACE rebinds the defining module's attribute and every
``from X import name`` copy that *is* the original function, in modules imported before or after
(``_propagate_patch``). Where the original is ``None`` that identity test would match every
``None`` global in the process, so those names are set by hand: on the defining module (later
importers copy it from there) and on the importers already loaded. ``reconstruct_tree`` imports
``sgl_kernel.speculative`` at module level, which needs libcuda, so no hook can even resolve it;
a stand-in module takes its place before ``ngram_worker`` imports it.

When the hooks take effect: ``sglang.srt.plugins.load_plugins()`` runs every general plugin and
then ``HookRegistry.apply_hooks()``, in each process SGLang starts (engine, scheduler,
detokenizer, DP controller). Called from our plugin's ``register()``, the REPLACE hooks are
therefore applied right after; a caller outside ``load_plugins`` must call
``HookRegistry.apply_hooks()`` itself. The ``None`` names and the stand-in module are set at once.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import logging
import sys
import types

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from turbo.spec import cache_ops, tree_ops

logger = logging.getLogger(__name__)

# SEAM: HookRegistry REPLACE; each original is a real function, so identity propagation is exact.
REPLACE_HOOKS = {
    "sglang.srt.mem_cache.allocation.assign_req_to_token_pool_func": cache_ops.assign_req_to_token_pool,
    "sglang.kernels.ops.speculative.cache_locs.assign_draft_cache_locs_contiguous_func": cache_ops.assign_draft_cache_locs_contiguous,
    "sglang.kernels.ops.speculative.spec_tree.build_tree_kernel_efficient_func": tree_ops.build_tree_kernel_efficient,
    "sglang.kernels.ops.speculative.spec_tree.verify_tree_greedy_func": tree_ops.verify_tree_greedy,
    "sglang.kernels.ops.speculative.eagle.fill_bonus_tokens_func": cache_ops.fill_bonus_tokens,
    "sglang.kernels.ops.speculative.cache_locs.fill_front_out_cache_loc_func": cache_ops.fill_front_out_cache_loc,
    "sglang.kernels.ops.speculative.eagle.fill_accept_out_cache_loc_func": cache_ops.fill_accept_out_cache_loc,
}

# SEAM: plain setattr, only where the current value is None (never over a real kernel).
# module defining the name -> {name: ours}
NONE_NAMES = {
    "sglang.kernels.ops.speculative.verify_sampling": {
        "tree_speculative_sampling_target_only": tree_ops.tree_speculative_sampling_target_only,
    },
    "sglang.kernels.ops.sampling.renorm": {
        "top_k_renorm_prob": tree_ops.top_k_renorm_prob,
        "top_p_renorm_prob": tree_ops.top_p_renorm_prob,
    },
}
# Modules that ``from ... import`` those names (grep of sglang 0.5.23). Patched only if already
# loaded; one imported later copies our function from the defining module. ``layers/sampler.py``
# imports the renorms only on CUDA/MUSA/XPU, so it holds no such name here.
NONE_NAME_IMPORTERS = ("sglang.srt.speculative.eagle_utils", "sglang.srt.speculative.dflash_utils")

# SEAM: sys.modules stand-in; the real module imports sgl_kernel.speculative at load.
RECONSTRUCT_TREE_MODULE = "sglang.kernels.ops.speculative.reconstruct_tree"
RECONSTRUCT_TREE_NAMES = (
    "reconstruct_indices_from_tree_mask_func",  # what ngram_worker imports
    "reconstruct_indices_from_tree_mask",  # the compiled op's name, imported by the real module
    "reconstruct_indices_from_tree_mask_triton",  # listed in sglang.kernels.ops.speculative's inventory
)

# The platform's verify-slots function; TurboCpuPlatform.get_speculative_cache_locs_fn returns it.
SPECULATIVE_CACHE_LOCS_FN = cache_ops.assign_extend_cache_locs

_installed = False


def install_kernel_fallbacks(*, apply: bool = False) -> None:
    """Install the torch ops of the table above; idempotent.

    Only for processes on the portable platform (``plugin.register`` checks; on CUDA these would
    replace working kernels). ``apply=True`` also runs ``HookRegistry.apply_hooks()``, for a caller
    outside ``load_plugins`` (e.g. once the scheduler process is up); inside ``load_plugins`` leave
    it False, SGLang applies every plugin's hooks right after.
    """
    global _installed
    if not _installed:
        for target, ours in REPLACE_HOOKS.items():
            HookRegistry.register(target, ours, HookType.REPLACE)
        _set_none_names()
        _install_reconstruct_tree()
        _installed = True
    if apply:
        HookRegistry.apply_hooks()  # skips targets already patched


def _set_none_names() -> None:
    for module_name, names in NONE_NAMES.items():
        module = importlib.import_module(module_name)
        for name, ours in names.items():
            if getattr(module, name, None) is None:
                setattr(module, name, ours)
    for importer in NONE_NAME_IMPORTERS:
        module = sys.modules.get(importer)
        if module is None:
            continue
        for names in NONE_NAMES.values():
            for name, ours in names.items():
                if name in vars(module) and getattr(module, name) is None:
                    setattr(module, name, ours)


def _install_reconstruct_tree() -> None:
    ours = tree_ops.reconstruct_indices_from_tree_mask
    existing = sys.modules.get(RECONSTRUCT_TREE_MODULE)
    if existing is not None and not getattr(existing, "__sglang_turbo_stand_in__", False):
        # The real module loaded (sgl_kernel importable): still route its entry point to torch,
        # since its branch for our platform calls a CUDA op.
        original = getattr(existing, "reconstruct_indices_from_tree_mask_func", None)
        setattr(existing, "reconstruct_indices_from_tree_mask_func", ours)
        ngram_worker = sys.modules.get("sglang.srt.speculative.ngram_worker")
        if ngram_worker is not None and getattr(ngram_worker, "reconstruct_indices_from_tree_mask_func", None) is original:
            ngram_worker.reconstruct_indices_from_tree_mask_func = ours
        return
    module = types.ModuleType(RECONSTRUCT_TREE_MODULE, "sglang-turbo stand-in: NGRAM tree-mask reconstruction in torch.")
    module.__spec__ = importlib.machinery.ModuleSpec(RECONSTRUCT_TREE_MODULE, loader=None)
    module.__package__ = RECONSTRUCT_TREE_MODULE.rpartition(".")[0]
    module.__sglang_turbo_stand_in__ = True
    for name in RECONSTRUCT_TREE_NAMES:
        setattr(module, name, ours)
    module.__all__ = list(RECONSTRUCT_TREE_NAMES)
    sys.modules[RECONSTRUCT_TREE_MODULE] = module
    package = importlib.import_module(module.__package__)
    setattr(package, "reconstruct_tree", module)  # so attribute access on the package finds it too
