"""imagesearch Python client."""
