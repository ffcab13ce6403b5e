"""Split nested training state (optimizer, scheduler, scaler, RNG...) into tensors and a JSON skeleton,
and join them back. This is how a checkpoint holds arbitrary state without pickle: loading it can
never run code, whatever a file contains.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able skeleton of `obj`; tensors (and numpy arrays) go to `tensors` under `key`-derived names."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__ndarray__": key}
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, np.generic):
        return encode(obj.item(), key, tensors)
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, f"{key}/{k}", tensors) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"state key {k!r} at {key} is a {type(k).__name__}; only str and int keys can be saved")
            items.append([k, encode(v, f"{key}/{k}", tensors)])
        return {"__dict__": items}
    raise TypeError(
        f"state at {key} is a {type(obj).__name__}, which a checkpoint cannot hold without pickle; "
        "convert it to tensors, numbers, strings, lists or dicts"
    )


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, val), = obj.items()
        if tag == "__tensor__":
            return tensors[val]
        if tag == "__ndarray__":
            return tensors[val].numpy()
        if tag == "__tuple__":
            return tuple(decode(v, tensors) for v in val)
        if tag == "__dict__":
            return {k: decode(v, tensors) for k, v in val}
        if tag == "__float__":
            return float(val)
        if tag == "__dtype__":
            return getattr(torch, val)
    return {k: decode(v, tensors) for k, v in obj.items()}
