"""Edge export of a served adapter version: a merged model and GGUF, behind a consistency gate."""

from workers.export.build import run_export
from workers.export.consistency import Tolerance

__all__ = ["Tolerance", "run_export"]
