"""Checkpoint bytes, in one place: every read, write, verification, resolution, commit and deletion of a
checkpoint goes through this package. Nothing here imports torch at import time except
`safetensors_file` and `statecodec` (the trainer's side), so the daemon uses all the rest.

- `names`: checkpoint names and patterns, `native_name`, the one ASCII-digit step rule (`step_in_name`,
  `as_step`, `number_in_name`), pointer names, the `Status` and `Layout` enums.
- `catalog`: one scan of a checkpoint folder into `Entry`s (layout, status, step, metrics), cached checks.
- `resolve`: the one meaning of `which` (latest | best | a step | a name | a path) and the one walk to the
  newest checkpoint that verifies, with fallback (`newest_verified`, `steps_back`, `first_good`); used by
  the trainer's load, the supervisor, the integrations, consolidate, snapshot, replica restore, `list`,
  the dashboard and `status` (tests/test_resolve.py holds the table).
- `manifest`, `foreign`: the format of native checkpoints and of other trainers' (Hugging Face,
  Lightning, plain torch.save) with their sealed sidecar manifests; the one bounded safetensors header
  reader (`manifest.safetensors_header_length` / `safetensors_header`).
- `dtypes`: the one dtype table (safetensors codes, torch names, sizes, decoders, precisions).
- `safetensors_file`: writing, mapping, hashing and parsing safetensors files (torch).
- `torchzip/`: reading torch.save files with no torch and no unpickling (bounds, archive, unpickle,
  extract); every problem has a `kind`.
- `problems`: typed problems (`Problem(kind, message)`), so no caller reads a status out of a message.
- `statecodec`: nested training state as tensors plus a JSON skeleton (no pickle).
- `verifyonce`: trusting a checksum already proven for the same bytes.
- `commit`: the one commit primitive (scratch, fsync, rename under the commit lock, parent fsync,
  optional sidecar, a taken name into quarantine).
- `delete`: quarantine, removal, scratch cleanup, cleanup's trash and journal.
- `locks`: the one lock class.
"""
