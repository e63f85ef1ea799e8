"""MII's gRPC service (`legacymodelresponse.ModelResponse`) without MII's package.

`import mii` imports torch and deepspeed (about 350 MB per process), and so does any `mii.legacy....`
module, since a package's `__init__` runs before its submodules. The processes that run no model (the
load balancer, the REST gateway, a batch or bench client) need only MII's generated message classes,
which import nothing but protobuf. `messages()` loads that one generated file from MII's installed
package, under a module name of ours, without running MII's `__init__`; a process that has imported
MII already gets MII's own module. Either way the message classes are MII's (protobuf's descriptor pool
holds the file once, so a process that imports MII later shares them). The service's methods are read
from its descriptor, so stubs and servers here speak exactly MII's wire format. Standard library, grpc and protobuf only.
"""
from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path

from ..errors import InvalidParameter
from .errors import ServingError

SERVICE = "legacymodelresponse.ModelResponse"
PB2 = "fastsd.serving._mii_messages"  # MII's generated file, loaded under a name of ours (see messages)
MII_PB2 = "mii.legacy.grpc_related.proto.legacymodelresponse_pb2"
GRPC_MAX_MSG_SIZE = 2**27  # mii.legacy.constants.GRPC_MAX_MSG_SIZE (tests/serving/test_light_imports.py checks it)
TERMINATE = "Terminate"  # mii.legacy.constants.TERMINATE_METHOD
IMAGE_METHODS = ("Txt2ImgReply", "InpaintingReply")
MESSAGE_OPTIONS = [("grpc.max_send_message_length", GRPC_MAX_MSG_SIZE),
                   ("grpc.max_receive_message_length", GRPC_MAX_MSG_SIZE)]
VALUE_FIELDS = {str: "svalue", int: "ivalue", float: "fvalue", bool: "bvalue"}  # MII's dtype_proto_field
_loading = threading.Lock()  # the gateway's threads ask at once: one loads, none sees a half-made module


def messages():
    """MII's generated module of messages (Text2ImageRequest, InpaintingRequest, ImageReply, Value, ...)."""
    for name in (MII_PB2, PB2):  # MII's own module where this process imported MII
        if name in sys.modules:
            return sys.modules[name]
    with _loading:
        if PB2 in sys.modules:
            return sys.modules[PB2]
        spec = importlib.util.find_spec("mii")  # finds MII's package without running it
        if spec is None or not spec.submodule_search_locations:
            raise ServingError("DeepSpeed-MII is not installed: pip install 'fastsd[serving]', then "
                               "pip install --no-deps deepspeed-mii (see docs/serving.md, Install)")
        path = Path(spec.submodule_search_locations[0]) / "legacy" / "grpc_related" / "proto" / \
            "legacymodelresponse_pb2.py"
        file_spec = importlib.util.spec_from_file_location(PB2, path)
        mod = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(mod)
        sys.modules[PB2] = mod  # only once it is whole
        return mod


def methods() -> dict:
    """Method name -> (request class, reply class), for every method of MII's service."""
    from google.protobuf import message_factory
    service = messages().DESCRIPTOR.services_by_name["ModelResponse"]
    return {m.name: (message_factory.GetMessageClass(m.input_type), message_factory.GetMessageClass(m.output_type))
            for m in service.methods}


def path(method: str) -> str:
    return f"/{SERVICE}/{method}"


def stub(channel, method: str):
    """A callable for one method on `channel` (grpc's unary-unary multicallable)."""
    request, reply = methods()[method]
    return channel.unary_unary(path(method), request_serializer=request.SerializeToString,
                               response_deserializer=reply.FromString)


def handlers(factory) -> object:
    """A grpc generic handler for every method of MII's service: `factory(name, request class, reply
    class)` returns each method's grpc.RpcMethodHandler."""
    import grpc
    return grpc.method_handlers_generic_handler(
        SERVICE, {name: factory(name, request, reply) for name, (request, reply) in methods().items()})


def query_kwargs(kwargs: dict) -> dict:
    """Keyword values -> MII's `Value` messages (str, int, float, bool, as MII's client packs them)."""
    value = messages().Value
    out = {}
    for k, v in kwargs.items():
        field = VALUE_FIELDS.get(type(v))
        if field is None:
            raise InvalidParameter(k, v, "a str, int, float or bool (what MII's query keywords carry)")
        out[k] = value(**{field: v})
    return out


class ImageReply:
    """MII's ImageReply as MII's client returns it (mii.legacy.models.utils.ImageResponse): PIL images,
    decoded when first read, and one safety flag per image."""

    def __init__(self, reply):
        self._reply = reply
        self.nsfw_content_detected = list(reply.nsfw_content_detected)
        self._images = None

    @property
    def images(self) -> list:
        if self._images is None:
            from PIL import Image
            size = (self._reply.size_w, self._reply.size_h)
            self._images = [Image.frombytes(self._reply.mode, size, b) for b in self._reply.images]
        return self._images
