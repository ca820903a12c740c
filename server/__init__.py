"""imagesearch server.

OpenCV reads OPENCV_IO_MAX_IMAGE_PIXELS once, when cv2 is first imported, so the
server package sets it before any of its modules (or the plugins it loads)
import cv2. It is a second line of defence behind the header check in
imaging.check_image.
"""

import os

os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 30))
