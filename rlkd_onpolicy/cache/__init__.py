"""Teacher top-k cache: run a teacher once, store its sparse distribution per completion token, read it in training.

Build: `python -m rlkd_onpolicy.cache build --teacher PATH --dataset FILE --out DIR --k 64` (docs/cache.md).
"""

from rlkd_onpolicy.cache.format import FORMAT_VERSION, CacheHeader, tokenizer_hash
from rlkd_onpolicy.cache.reader import TeacherCache
from rlkd_onpolicy.cache.writer import build_cache

__all__ = ["FORMAT_VERSION", "CacheHeader", "TeacherCache", "build_cache", "tokenizer_hash"]
