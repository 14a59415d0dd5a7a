"""Teacher top-k cache: run the teacher once, then distil and analyse from disk as often as you like.

`kdviz.cache.capture.build` (CLI: `kdviz teacher-cache`) makes one, part by part (resumable, and
shared between processes under torchrun); `kdviz.cache.importing.from_logprobs` makes one from
top-k log-probs another tool wrote (vLLM's prompt_logprobs); `kdviz.cache.importing.convert`
re-encodes one; `TeacherCache.open` reads it; `kdviz.load_pair(None, student, teacher_cache=folder)`
gives a pair whose teacher is read from it. See docs/teacher-cache.md.
"""

from kdviz.cache.capture import build
from kdviz.cache.format import TeacherCache

__all__ = ["TeacherCache", "build"]
