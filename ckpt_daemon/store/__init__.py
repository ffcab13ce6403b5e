"""Checkpoint bytes, in one place: every read, write, verification, resolution, commit and deletion of a
checkpoint goes through this package. Nothing here imports torch at import time, so the daemon can use
all of it (the modules that need torch import it where they run).

- `names`: checkpoint names and patterns, `native_name`, the ASCII step-from-name rule, pointer names.
- `catalog`: one scan of a checkpoint folder into `Entry`s (layout, status, step, metrics), cached checks.
- `resolve`: the one meaning of `which` (latest | best | a step | a path) and the one newest-verified walk
  with fallback, used by the trainer's load, the supervisor, the integrations, consolidate, snapshot,
  restore, cleanup and status.
- `manifest`, `foreign`: the format of native checkpoints and of other trainers' (Hugging Face,
  Lightning, plain torch.save) with their sealed sidecar manifests.
- `safetensors_file`: the one bounded safetensors header reader, writer and dtype table.
- `torchzip`: reading torch.save files with no torch and no unpickling.
- `statecodec`: nested training state as tensors plus a JSON skeleton (no pickle).
- `verifyonce`: trusting a checksum already proven for the same bytes.
- `commit`: the one commit primitive (scratch, fsync, rename, parent fsync, under the commit lock), with
  an optional sidecar manifest written before the rename and "replace a taken name into quarantine".
- `locks`: the one lock class (flock on a regular file we create, pid as information, try or deadline).
- `delete`: quarantine (and its listing), removal, dead scratch, the trash and a cleanup's journal.
- `problems`: typed verification problems (`Problem(kind, message)`).
"""
