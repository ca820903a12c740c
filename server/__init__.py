"""imagesearch server.

OpenCV reads OPENCV_IO_MAX_IMAGE_PIXELS once, when cv2 is first imported, so the
server package sets it before any of its modules (or the plugins it loads)
import cv2. It is a second line of defence behind the header check in
imaging.check_image, with the decoded-size check after decoding as the third.

NumPy's OpenBLAS reads OPENBLAS_THREAD_TIMEOUT once, when NumPy is first
imported: by default its helper threads spin for about 0.1 s of CPU after every
matrix product (a lone query's scan, vector_index.GEMV_MAX_QUERIES), which on
two cores takes one from the batches, extractions and requests that follow.
2^4 cycles instead (bench/bench_search_threads.py measures both).

FAISS's OpenMP runtime (libgomp) reads GOMP_SPINCOUNT and OMP_WAIT_POLICY once,
when it loads: by default a thread that finishes its share of a parallel loop
spins for milliseconds waiting for the next one (more than 5 ms of CPU in a
20 ms pause: tests/test_server_environment.py's probe). On cores shared with other
work (another process here) that turned 16 concurrent searches slower than one;
sleeping at once (OMP_WAIT_POLICY=PASSIVE) cost a third of their speed on a quiet
machine, where the spin bridges the gaps between the loops of one batch. 10,000
spins (under 4 ms in that probe) keep most of both (bench/README.md, "OpenMP threads"). Set only
when the environment says nothing of either: an operator's choice wins.
"""

import os

# The default max_image_pixels (server.config.Limits); the server refuses a larger limit unless
# this variable is raised with it (imaging.check_decoder_cap).
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", "40000000")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"
