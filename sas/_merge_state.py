"""What SaSLinear and ScalingLinear share: folding an update into the frozen weight and taking it out again.

:class:`MergeableLinear` keeps the merge state of a layer that wraps a frozen ``base_layer``: the
``sas_merged`` flag (a buffer, so it travels with the weights in a ``state_dict``), and the copy of the
weight taken at merge, which :meth:`MergeableLinear.unmerge` puts back bit for bit. A subclass says what
the merged weight is (``_fold``) and what else refuses an unmerge (``_update_refusal``).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional, Tuple

import torch
from torch import nn


class MergeableLinear(nn.Module):
    """Base of the adapted layers: merge/unmerge of ``base_layer.weight`` with a bit-exact restore."""

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def _init_merge_state(self, device: torch.device) -> None:
        # The flag is a persistent buffer so it travels with the weights in a state_dict: loading a merged
        # model's weights into an unmerged one must not add the update twice. forward() reads the Python
        # mirror, never the device tensor (no host sync per call).
        self.register_buffer("sas_merged", torch.zeros((), dtype=torch.bool, device=device))
        self._merged = False
        self._merge_record: Optional[tuple] = None  # (weight, its _write_stamp after merge, its copy before merge)
        self._merged_task: Optional[int] = None
        self.register_load_state_dict_pre_hook(_merged_flag_follows_weight)
        self.register_load_state_dict_post_hook(_sync_merged_flag)

    @property
    def merged(self) -> bool:
        """Whether the update is folded into ``base_layer.weight`` (saved as the ``sas_merged`` buffer)."""
        return self._merged

    def _set_merged(self, merged: bool) -> None:
        self._merged = merged
        with _writable(self.sas_merged):
            self.sas_merged.fill_(merged)

    def _fold(self, task: Optional[int]) -> Tuple[Optional[torch.Tensor], Optional[str]]:
        """``(the merged weight, None)``, or ``(None, why merging would refuse)``."""
        raise NotImplementedError

    def _folded_task(self, task: Optional[int]) -> Optional[int]:
        """The task :meth:`merge` records as folded in (``None`` for an adapter without tasks)."""
        return None

    def _update_refusal(self) -> Optional[str]:
        """Why the current update forbids an unmerge (``None`` when nothing does)."""
        return None

    def merge_refusal(self, task: Optional[int] = None) -> Optional[str]:
        """Why :meth:`merge` of ``task`` would refuse (``None`` when it would not)."""
        return self._fold(task)[1]

    @torch.no_grad()
    def merge(self, task: Optional[int] = None) -> None:
        """Fold the update (of ``task``, where the adapter has several) into ``base_layer.weight``; refuses
        (``ValueError``, weight untouched) what ``_fold`` refuses: a non-finite update, or a merged weight
        that overflows the weight's dtype.

        Keeps a copy of the weight as it was (one more weight of memory while merged), so that
        :meth:`unmerge` restores it bit for bit even if the adapter changes while merged.
        """
        if self.merged:
            warnings.warn(f"{type(self).__name__} is already merged; merge() did nothing", UserWarning,
                          stacklevel=2)
            return
        folded, reason = self._fold(task)
        if reason is not None:
            raise ValueError(f"refusing to merge: {reason}")
        weight = self.base_layer.weight
        before = weight.detach().clone()
        with _writable(weight):
            weight.copy_(folded)
        self._merge_record = (weight, _write_stamp(weight), before)
        self._merged_task = self._folded_task(task)
        self._set_merged(True)

    def _weight_as_merged(self) -> bool:
        """Whether the weight is still the one :meth:`merge` wrote, so that its kept copy describes it."""
        weight, stamp, _ = self._merge_record or (None, None, None)
        # Any write since merge (load_state_dict, an optimizer step, copy_) changes the stamp, and
        # restoring the copy would undo it; .to(dtype/device) keeps the Parameter and its version.
        return weight is self.base_layer.weight and stamp == _write_stamp(weight)

    def unmerge_refusal(self) -> Optional[str]:
        """Why :meth:`unmerge` would refuse (``None`` when it would not)."""
        if not self._weight_as_merged():
            return ("its weight before merge is not known: the merged weight was loaded (e.g. from a merged "
                    "model's state_dict) or written since merge; load the base weights and the adapter instead")
        return self._update_refusal()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore ``base_layer.weight`` exactly as it was before :meth:`merge`.

        The update is not taken out arithmetically (that drifts by rounding, and by every adapter change
        made while merged): the copy taken by :meth:`merge` is put back. Refuses (``ValueError``, nothing
        changed) when that copy no longer describes the weight, or when :meth:`unmerge_refusal` says why not.
        """
        if not self.merged:
            warnings.warn(f"{type(self).__name__} is not merged; unmerge() did nothing", UserWarning, stacklevel=2)
            return
        reason = self.unmerge_refusal()
        if reason is not None:
            raise ValueError(f"refusing to unmerge: {reason}")
        weight, _, before = self._merge_record
        with _writable(weight):
            weight.copy_(before)
        self._merge_record = None
        self._merged_task = None
        self._set_merged(False)

    def __getstate__(self):
        state = super().__getstate__()
        # The route a subclass's forward cached for its last input signature holds what this process runs
        # (op packets, which pickle refuses, and the shared owner's cache of 8-bit copies, which holds weak
        # references): never copied, it is picked again at the copy's first call.
        if "_route" in state:
            state["_route"], state["_signature"] = None, None
        # copy.deepcopy and pickle give the copy a new weight tensor with a version counter of its own:
        # the record keeps only whether the weight was still as merge left it, and the copy re-stamps it.
        if self._merge_record is not None:
            weight, _, before = self._merge_record
            state["_merge_record"] = (weight, self._weight_as_merged(), before)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if self._merge_record is not None:
            weight, unchanged, before = self._merge_record
            self._merge_record = (weight, _write_stamp(weight) if unchanged else None, before)


def _writable(tensor: torch.Tensor):
    """A context in which ``tensor`` may be written in place: an inference tensor (made under
    ``torch.inference_mode()``) only accepts in-place writes inside inference mode."""
    return torch.inference_mode() if tensor.is_inference() else contextlib.nullcontext()


# Integer dtypes of each floating-point width, to read a weight's bits.
_BITS_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Elements per step of the fingerprint, to bound its int64 temporaries (about 32 MiB each).
_FINGERPRINT_CHUNK = 1 << 22
# An odd 64-bit mixing constant (the golden ratio's, 0x9E3779B97F4A7C15, less its top bit so it fits int64).
_FINGERPRINT_MIX = 0x1E3779B97F4A7C15


def _bits_fingerprint(tensor: torch.Tensor) -> int:
    """A 64-bit fingerprint of ``tensor``'s bits: ``sum(bits_i * m_i) mod 2**64`` with a distinct odd
    multiplier per position, so any change of one element, and all but a 2**-64 share of other changes,
    give another value."""
    bits = tensor.detach().reshape(-1).view(_BITS_DTYPES[tensor.element_size()])
    total = 0
    for start in range(0, bits.numel(), _FINGERPRINT_CHUNK):
        chunk = bits[start:start + _FINGERPRINT_CHUNK].long()
        positions = torch.arange(start, start + chunk.numel(), device=chunk.device)
        total += int(((positions * _FINGERPRINT_MIX) | 1).mul_(chunk).sum())  # int64 products wrap mod 2**64
    return total % (1 << 64)


def _write_stamp(weight: torch.Tensor) -> tuple:
    """What changes when ``weight`` is written: its version counter, or for an inference tensor (which
    has none) a fingerprint of its bits."""
    return ("bits", _bits_fingerprint(weight)) if weight.is_inference() else ("version", weight._version)


def _merged_flag_follows_weight(layer: MergeableLinear, state_dict, prefix, *_unused) -> None:
    """Load-state pre-hook: a state without ``sas_merged`` (saved before the flag existed, or partial)."""
    key = prefix + "sas_merged"
    if key not in state_dict:
        # With the base weight in it, the state is an unmerged one from before the flag; without it, the
        # weight stays as it is and so does the flag.
        carries_weight = prefix + "base_layer.weight" in state_dict
        state_dict[key] = torch.zeros((), dtype=torch.bool) if carries_weight else layer.sas_merged.clone()


def _sync_merged_flag(layer: MergeableLinear, _incompatible_keys) -> None:
    layer._merged = bool(layer.sas_merged)
    if not layer._merged:  # an unmerged state was loaded: no update, and no task, is folded in any more
        layer._merge_record = None
        layer._merged_task = None
