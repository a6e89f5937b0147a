"""How a finished job reads to the service: a result, or a failure said plainly.

Failures split by what a retry could change. A pass that cannot handle the model (corrupt
file, unsupported operator or architecture, an export that fails its check) fails the same way
every time: the job ends with ``optimization.failed`` and the reason. A store or network fault
is transient: the event is redelivered and the job tried again.
"""

from __future__ import annotations

import asyncio
from typing import Any

from slmops.objectstore import ObjectStoreError
from slmops_optimizer.passes import JobCancelled, PassError


def classify(work: asyncio.Future[Any]) -> dict[str, Any]:
    """The last message of a job stream, from the finished job's future."""
    try:
        result = work.result()
    except JobCancelled:
        return {"kind": "cancelled"}
    except PassError as exc:
        return {"kind": "failed", "reason": str(exc), "transient": False}
    except (ObjectStoreError, ConnectionError, TimeoutError) as exc:
        return {"kind": "failed", "reason": f"{type(exc).__name__}: {exc}", "transient": True}
    except MemoryError:
        return {"kind": "failed", "reason": "the job ran out of memory", "transient": False}
    except Exception as exc:  # a deterministic crash in a pass: retrying won't help
        return {
            "kind": "failed",
            "reason": f"the job crashed: {type(exc).__name__}: {str(exc)[:300]}",
            "transient": False,
        }
    return {"kind": "result", "result": result.model_dump(mode="json")}
