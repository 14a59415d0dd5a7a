"""Teacher top-k cache: run the teacher once, then distil and analyse from disk as often as you like.

`kdviz.cache.capture.build` (CLI: `kdviz teacher-cache`) makes one; `TeacherCache.open` reads it;
`kdviz.load_pair(None, student, teacher_cache=folder)` gives a pair whose teacher is read from it.
"""

from kdviz.cache.capture import build
from kdviz.cache.format import TeacherCache

__all__ = ["TeacherCache", "build"]
