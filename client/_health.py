"""The two grpc.health.v1 messages the client needs, without depending on grpcio-health-checking.

The health-checking package is a server dependency; the client only sends one
``Check`` call. The messages are declared here from the public, frozen
grpc/health/v1/health.proto into a private descriptor pool, so they can never
clash with ``grpc_health`` when both are imported in one process (the server's
tests do that).
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor

_PACKAGE = "grpc.health.v1"


def _health_file() -> descriptor_pb2.FileDescriptorProto:
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="imagesearch/client/grpc_health_v1.proto", package=_PACKAGE, syntax="proto3"
    )
    request = proto.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    response = proto.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        status.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=field.TYPE_ENUM,
        label=field.LABEL_OPTIONAL,
        type_name=f".{_PACKAGE}.HealthCheckResponse.ServingStatus",
    )
    service = proto.service.add(name="Health")
    service.method.add(
        name="Check",
        input_type=f".{_PACKAGE}.HealthCheckRequest",
        output_type=f".{_PACKAGE}.HealthCheckResponse",
    )
    return proto


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_health_file())

CHECK: MethodDescriptor = _POOL.FindServiceByName(f"{_PACKAGE}.Health").methods_by_name["Check"]
HealthCheckRequest = message_factory.GetMessageClass(CHECK.input_type)
HealthCheckResponse = message_factory.GetMessageClass(CHECK.output_type)


def status_name(response: HealthCheckResponse) -> str:  # type: ignore[valid-type]
    """The serving status as its name: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN"."""
    enum = CHECK.output_type.fields_by_name["status"].enum_type
    value = enum.values_by_number.get(response.status)  # type: ignore[attr-defined]
    return value.name if value is not None else "UNKNOWN"
