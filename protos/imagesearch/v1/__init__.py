"""Generated gRPC bindings of the imagesearch.v1 contract (see protos/codegen.py).

The *_pb2 modules are produced by `make proto` (or by the package build) from
image_search_service.proto and are not committed.
"""
