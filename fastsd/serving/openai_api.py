"""The OpenAI Images API on the REST gateway (`/v1`), for the clients that speak it: the `openai` Python
client, Open WebUI's "openai" image engine, scripts written against OpenAI.

    POST /v1/images/generations  JSON {"model", "prompt", "n", "size": "WxH", "response_format": "b64_json" | "url",
                                  "quality", "style", "user", "background"} -> {"created": ..., "data": [{"b64_json": ...}]}
    POST /v1/images/edits        multipart: image, optional mask, prompt, n, size, response_format: with a mask
                                 inpainting (transparent = repaint, OpenAI's convention; a mask without
                                 transparency: white = repaint), without one image-to-image
    GET  /v1/models              {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "fastsd"}]}
    GET  /files/images/ID.png    an image answered with response_format "url" (for IMAGE_TTL_S; no token)

fastsd's own fields are accepted beside OpenAI's (the `openai` client sends them with `extra_body`): `seed`,
`num_inference_steps`, `guidance_scale`, `negative_prompt`, `scheduler`, `strength`, `lora` (NAME or
NAME:WEIGHT), `noise_level` (an x4 upscaler deployment's /v1/images/edits). Without a seed one is drawn here; each image of the answer carries its `seed`.
`quality`, `style` and `user` are accepted and change nothing, as is `background` "auto" or "opaque" (GPT-image's;
"transparent" is a 400: these images have none). Any other field is a 400.

The body becomes request.parse_query's fields and goes through the same client as `/score`
(gateway.py). Errors are OpenAI's shape {"error": {"message", "type", "param", "code"}}, with 400 for a
bad value, 401 for the token, 404 for an unknown model or route, 413, 429, 503 and 504, so the `openai`
client raises its own exception classes.
"""

import base64
import functools
import json
import random
import re
import time

from ..errors import InvalidParameter
from ..images import decode, encode_png
from .gateway import ApiError, Gateway, png_bytes
from .image_store import DEFAULT_TTL_S, ImageStore

PATHS = ("/v1/images/generations", "/v1/images/edits")  # the generation routes, labelled in the gateway's metrics
IMAGE_TTL_S = DEFAULT_TTL_S
FILES = "/files/images/"
OPENAI_FIELDS = ("model", "prompt", "n", "size", "response_format", "quality", "style", "user", "background")
BACKGROUNDS = ("auto", "opaque")  # GPT-image's `background` (Open WebUI's edits pass it on): fastsd's are opaque
EXTENSIONS = ("seed", "num_inference_steps", "guidance_scale", "negative_prompt", "scheduler", "strength", "lora",
              "noise_level")
EDIT_FILES = ("image", "image[]", "mask")
RESPONSE_FORMATS = ("b64_json", "url")
SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
# fastsd's names in errors -> the field the caller sent
PARAM_NAMES = {"num_images_per_prompt": "n", "height": "size", "width": "size", "height x width": "size",
               "image": "image", "mask_image": "mask", "prompt": "prompt"}
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error"}
ERROR_CODES = {401: "invalid_api_key", 413: "request_too_large", 429: "rate_limit_exceeded", 504: "timeout",
               503: "service_unavailable"}
INT_FIELDS = ("n", "seed", "num_inference_steps", "noise_level")  # multipart values arrive as text
FLOAT_FIELDS = ("guidance_scale", "strength")


def openai_error(e: ApiError, request_id: str):
    from fastapi.responses import JSONResponse  # lazy: the serving extra; `fastsd` commands never import it
    status = 400 if e.status == 422 else e.status
    code = ERROR_CODES.get(status, "invalid_value" if status == 400 else None)
    if status == 404 and e.param == "model":
        code = "model_not_found"
    body = {"error": {"message": e.message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": PARAM_NAMES.get(e.param, e.param), "code": code}}
    return JSONResponse(body, status_code=status, headers={**e.headers, "X-Request-ID": request_id})


def translate(body: dict, gw: Gateway, multipart: bool = False) -> tuple[dict, str]:
    """An Images API body -> (parse_query's fields, response_format). Refuses unknown fields and values."""
    unknown = [k for k in body if k not in OPENAI_FIELDS + EXTENSIONS]
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: {unknown[0]} (allowed: "
                            f"{', '.join(OPENAI_FIELDS + EXTENSIONS)})", unknown[0])
    if multipart:
        body = {k: _number(k, v) for k, v in body.items()}
    model = body.get("model")
    if model is not None and model != gw.model_id:
        raise ApiError(404, f"The model '{model}' does not exist; this deployment serves '{gw.model_id}' "
                            "(GET /v1/models)", "model")
    for k in ("quality", "style", "user"):
        if body.get(k) is not None and not isinstance(body[k], str):
            raise ApiError(400, f"{k}: expected a string", k)
    if body.get("background") is not None and body["background"] not in BACKGROUNDS:
        raise ApiError(400, f"background: got {body['background']!r}; allowed: {', '.join(BACKGROUNDS)} (fastsd's "
                            "images have no transparency)", "background")
    fmt = body.get("response_format") or "b64_json"
    if fmt not in RESPONSE_FORMATS:
        raise ApiError(400, f"response_format: got {fmt!r}; allowed: {', '.join(RESPONSE_FORMATS)}",
                       "response_format")
    if "prompt" not in body:
        raise ApiError(400, "prompt: required", "prompt")
    params = {k: body[k] for k in ("num_inference_steps", "guidance_scale", "scheduler", "strength", "lora", "seed",
                                   "noise_level") if body.get(k) is not None}
    if body.get("n") is not None:
        params["num_images_per_prompt"] = body["n"]
    size = body.get("size")
    if size is not None and size != "auto":
        m = SIZE.match(size) if isinstance(size, str) else None
        if not m:
            raise ApiError(400, f"size: got {size!r}; allowed: WIDTHxHEIGHT in pixels, e.g. 512x512, or auto", "size")
        params["width"], params["height"] = int(m.group(1)), int(m.group(2))
    if "seed" not in params:
        params["seed"] = random.randrange(2**31)  # drawn here, so the answer can say which seed each image had
    negative = body.get("negative_prompt")
    return {"prompt": body["prompt"], "negative_prompt": None if negative is None else [negative],
            "parameters": params}, fmt


def _number(name: str, value):
    """A multipart form value (text) -> the number the JSON body would carry."""
    if not isinstance(value, str) or name not in INT_FIELDS + FLOAT_FIELDS:
        return value
    try:
        return int(value) if name in INT_FIELDS else float(value)
    except ValueError:
        kind = "an integer" if name in INT_FIELDS else "a number"
        raise ApiError(400, f"{name}: got {value!r}; allowed: {kind}", name) from None


def edit_mask(data: bytes, gw: Gateway) -> bytes:
    """An edits mask -> fastsd's (white = repaint): a mask with transparent pixels marks them (OpenAI's
    convention: alpha 0 = repaint); one without transparency is read as black and white."""
    lim = gw.limits
    try:
        im = decode(data, "mask", max_bytes=lim.max_image_bytes, max_pixels=lim.max_pixels, mode="RGBA")
    except InvalidParameter as e:
        raise ApiError(400, str(e), "mask") from None
    alpha = im.getchannel("A")
    if alpha.getextrema()[0] < 255:
        return encode_png(alpha.point(lambda a: 255 if a == 0 else 0))
    return encode_png(im.convert("L"))


def mount(app, gw: Gateway) -> None:
    """The routes, on the REST gateway's FastAPI app."""
    from fastapi import Request  # lazy: the serving extra
    from fastapi.responses import JSONResponse, Response

    store = ImageStore(ttl=IMAGE_TTL_S)

    def model_card() -> dict:
        return {"id": gw.model_id, "object": "model", "created": int(gw.spec.created_at), "owned_by": "fastsd"}

    async def answer(request: Request, fields: dict, fmt: str):
        query = gw.query(fields, PARAM_NAMES)
        reply = await gw.generate(request, query)
        seed = query.parameters["seed"]
        data = []
        for i, image in enumerate(reply.images):
            png = png_bytes(image)
            if fmt == "url":
                item = {"url": f"{str(request.base_url).rstrip('/')}{FILES}{store.put(png)}.png"}
            else:
                item = {"b64_json": base64.b64encode(png).decode()}
            data.append({**item, "seed": seed + i})
        w, h = reply.images[0].size if reply.images else (0, 0)
        return JSONResponse({"created": int(time.time()), "data": data, "size": f"{w}x{h}", "output_format": "png"})

    def guarded(handler):
        @functools.wraps(handler)
        async def route(request: Request, **kw):
            try:
                gw.check_token(request)
                return await handler(request, **kw)
            except ApiError as e:
                return openai_error(e, request.state.request_id)
        return route

    async def generations(request: Request):
        raw = await gw.body(request)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ApiError(400, f"the body is not JSON: {str(e)[:200]}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        fields, fmt = translate(body, gw)
        return await answer(request, fields, fmt)

    async def edits(request: Request):
        raw = await gw.body(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(400, "expected a multipart/form-data body (image, optional mask, prompt, ...)")

        async def receive():
            return {"type": "http.request", "body": raw, "more_body": False}
        try:
            form = await Request(request.scope, receive).form(max_files=3, max_fields=64, max_part_size=len(raw) + 1)
        except Exception as e:  # noqa: BLE001 - starlette/multipart raise several types for a malformed body
            raise ApiError(400, f"the multipart body cannot be read: {str(e)[:200]}") from None
        files, values = {}, {}
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                if key not in EDIT_FILES or key.rstrip("[]") in files:
                    raise ApiError(400, f"{key}: one image file, and one mask file at most", key)
                files[key.rstrip("[]")] = await value.read()
            else:
                values[key] = value
        for key in [k for k in values if k in EDIT_FILES]:
            raise ApiError(400, f"{key}: expected a file upload", key)
        if "image" not in files:
            raise ApiError(400, "image: required (an image file)", "image")
        fields, fmt = translate(values, gw, multipart=True)
        fields["image"] = [files["image"]]
        if "mask" in files:
            fields["mask_image"] = [edit_mask(files["mask"], gw)]
        return await answer(request, fields, fmt)

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request, model: str):
        if model != gw.model_id:
            raise ApiError(404, f"The model '{model}' does not exist; this deployment serves '{gw.model_id}'", "model")
        return JSONResponse(model_card())

    async def unknown(request: Request, path: str):
        raise ApiError(404, f"fastsd serves no route {request.method} /v1/{path} (it serves /v1/images/generations, "
                            "/v1/images/edits and /v1/models)")

    app.add_api_route("/v1/images/generations", guarded(generations), methods=["POST"])
    app.add_api_route("/v1/images/edits", guarded(edits), methods=["POST"])
    app.add_api_route("/v1/models", guarded(models), methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", guarded(model), methods=["GET"])
    app.add_api_route("/v1/{path:path}", guarded(unknown), methods=["GET", "POST", "PUT", "DELETE", "PATCH"])

    @app.get(FILES + "{key}.png")
    def image_file(key: str):
        png = store.get(key)
        if png is None:
            return JSONResponse({"error": {"message": "no such image (image URLs expire after "
                                           f"{IMAGE_TTL_S:g} s)", "type": "invalid_request_error",
                                           "param": None, "code": "not_found"}}, status_code=404)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=600"})
