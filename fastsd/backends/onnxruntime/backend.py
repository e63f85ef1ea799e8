"""ONNX Runtime backend: runs the graphs of an ONNX export (`fastsd export`) inside the engine's loop.

The model is what `fastsd.export.load_onnx_model(DIR)` returns: tokenizer and scheduler, and in place of
the torch modules objects that carry `.config` and the graph paths. Providers follow --device: cpu, the
CPU provider; cuda[:N], TensorRT then CUDA, where this onnxruntime build has them (FASTSD_ORT_PROVIDERS=
Name,Name overrides both);
`describe()` reports the providers each session actually got, which is what counts (onnxruntime-gpu
falls back to CPU quietly when CUDA libraries are missing). Tensors stay on the CPU on the engine's side.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch

from ...errors import InvalidParameter, ModelLoadError

log = logging.getLogger("fastsd")

TRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = (TRT, "CUDAExecutionProvider")
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
       "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelLoadError("backend onnxruntime: the onnxruntime package is not installed "
                             "(pip install 'fastsd[onnx]'; one of onnxruntime or onnxruntime-gpu, never both)") from None
    return ort


class Misplaced(RuntimeError):
    """A session that did not get the device its provider options named (onnxruntime's own fallback ran)."""


def _session(ort, source, so, providers: list[str], provider_options: list[dict]):
    # enable_fallback=0: on a provider error onnxruntime would retry with CUDA and CPU and no provider options
    # at all (TensorRT silently off, device_id dropped so cuda:1 ran on GPU 0); _Graph retries itself instead.
    # onnxruntime 1.18-1.22 ignore the flag (InferenceSession sets _enable_fallback = True whatever it is
    # given; 1.23 reads it), so the placement is checked too: a GPU provider on another device than asked is
    # refused here, and _Graph's retry (with the options) or its error follows.
    sess = ort.InferenceSession(source if isinstance(source, bytes) else str(source), so, providers=providers,
                                provider_options=provider_options, enable_fallback=0)
    wrong = misplaced(sess, providers, provider_options)
    if wrong:
        raise Misplaced(f"onnxruntime {getattr(ort, '__version__', '?')} fell back on its own and dropped the "
                        f"provider options: {wrong} (onnxruntime 1.23+ honours enable_fallback=0)")
    return sess


def misplaced(sess, providers: list[str], provider_options: list[dict]) -> str:
    """'' when every GPU provider the session got runs on the device_id it was asked for, else what differs."""
    try:
        got = sess.get_provider_options()
    except Exception:  # an onnxruntime without get_provider_options: nothing to compare
        return ""
    for name, opts in zip(providers, provider_options):
        want = (opts or {}).get("device_id")
        have = (got.get(name) or {}).get("device_id")
        if want is not None and have is not None and str(have) != str(want):
            return f"{name} on device {have}, not {want}"
    return ""


def choose_providers(ort, device: str = "cpu") -> list[str]:
    """--device cpu: the CPU provider only; cuda[:N]: TensorRT then CUDA (whichever this onnxruntime build
    has), CPU last for ops they lack. Checked against onnxruntime, not torch: a CPU-only torch beside
    onnxruntime-gpu still runs the export on the GPU."""
    available = ort.get_available_providers()
    wanted = os.environ.get("FASTSD_ORT_PROVIDERS")
    if wanted:
        names = [p.strip() for p in wanted.split(",") if p.strip()]
        bad = [p for p in names if p not in available]
        if bad:
            raise InvalidParameter("FASTSD_ORT_PROVIDERS", wanted, ", ".join(available))
        return names
    if device == "cpu":
        return ["CPUExecutionProvider"]
    gpu = [p for p in GPU_PROVIDERS if p in available]
    if not gpu:
        raise InvalidParameter("device", device, "cpu (this onnxruntime has no CUDA or TensorRT provider; install "
                               "onnxruntime-gpu in place of onnxruntime)")
    return gpu + ["CPUExecutionProvider"]


def trt_profiles(folder) -> dict:
    """The TensorRT shape profiles an export wrote (trt_profiles.json), per graph; {} when there are none."""
    f = folder / "trt_profiles.json" if folder is not None else None
    try:
        return json.loads(f.read_text()) if f is not None and f.is_file() else {}
    except (OSError, ValueError):
        return {}


def is_optimized(export_info: dict, comp: str, paths: dict) -> bool:
    """Whether `comp` was written by `fastsd export --optimize` (its graphs hold onnxruntime contrib ops)."""
    if paths.get("gpu"):
        return True
    info = ((export_info.get("graphs") or {}).get(comp) or {}).get("model.onnx") or {}
    return info.get("variant", "plain") != "plain"


def trt_cache(folder, comp: str) -> str | None:
    """DIR/trt_cache/<graph>, created: onnxruntime's TensorRT provider makes only the last folder level and
    fails when the parent is missing. None (engine cache off) when the export folder is read-only."""
    if folder is None:
        return None
    path = folder / "trt_cache" / comp
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("onnxruntime: cannot create the TensorRT engine cache %s (%s): engines are rebuilt per "
                    "session", path, e.strerror or e)
        return None
    return str(path)


def provider_options(provider: str, comp: str, device: str, *, export_dtype: str, folder=None,
                     profile: dict | None = None) -> dict:
    """The options of one provider for `comp`'s session on `device`: cuda:N's device id for CUDA and
    TensorRT, TensorRT's engine cache, fp16 and shape profiles."""
    if provider == TRT:
        cache = trt_cache(folder, comp)
        opts = {"trt_engine_cache_enable": str(cache is not None), "trt_fp16_enable": str(export_dtype == "fp16")}
        if cache is not None:
            opts["trt_engine_cache_path"] = cache
        if device.startswith("cuda:"):
            opts["device_id"] = device.split(":")[1]
        if profile:
            dyn = {k: v for k, v in profile.items() if k != "timestep"}
            for point in ("min", "opt", "max"):
                opts[f"trt_profile_{point}_shapes"] = ",".join(
                    f"{k}:{'x'.join(map(str, v[point]))}" for k, v in dyn.items())
        return opts
    if provider == "CUDAExecutionProvider" and device.startswith("cuda:"):
        return {"device_id": device.split(":")[1]}
    return {}


def session_providers(providers: list[str], comp: str, device: str, *, export_dtype: str, folder=None,
                      profile: dict | None = None, optimized: bool = False) -> tuple[list[str], list[dict]]:
    """The providers and provider options of `comp`'s session (the backend's and the module runners')."""
    if TRT in providers and optimized:
        # onnxruntime's fused contrib ops split the graph: TensorRT would get subgraphs whose inputs have
        # no shape profiles, which onnxruntime refuses. Those graphs run on CUDA (and CPU) only.
        providers = [n for n in providers if n != TRT]
        log.info("onnxruntime: %s is an --optimize graph (onnxruntime contrib ops): CUDA, not TensorRT; "
                 "export without --optimize for TensorRT", comp)
    return providers, [provider_options(name, comp, device, export_dtype=export_dtype, folder=folder,
                                        profile=profile) for name in providers]


class _Graph:
    """One InferenceSession and what the engine needs to feed it."""

    def __init__(self, ort, name: str, path, providers: list[str], provider_options: list[dict], threads: int,
                 initializers: dict[str, np.ndarray] | None = None, model_bytes: bytes | None = None):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.name, self.path = name, path
        self.spec = (ort, name, path, providers, provider_options, threads)  # to make the same with other weights
        source = path
        if initializers:  # a LoRA set's fused weights in place of the export's (lora.py)
            # model_bytes: the graph with those initializers marked external, so that these values replace them
            # before onnxruntime's graph optimizations (which fold weights into new constants); onnxruntime reads
            # the buffers for as long as the session lives, so they stay referenced here
            self._values = [ort.OrtValue.ortvalue_from_numpy(a) for a in initializers.values()]
            so.add_external_initializers(list(initializers), self._values)
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
            source = model_bytes
        try:
            self.session = _session(ort, source, so, providers, provider_options)
        except Exception as e:  # onnxruntime raises its own exception types; Misplaced is ours
            if TRT not in providers or len(providers) == 1:
                raise ModelLoadError(f"model: onnxruntime cannot load {path}: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:300]}") from e
            # TensorRT could not start (libraries, an op it lacks): go on with the other providers and
            # their options, where onnxruntime's own retry would drop every option (device_id among them).
            log.warning("onnxruntime: TensorRT could not start for %s (%s); using %s", path,
                        str(e).splitlines()[0][:200], ", ".join(p for p in providers if p != TRT))
            i = providers.index(TRT)
            providers, provider_options = providers[:i] + providers[i + 1:], provider_options[:i] + provider_options[i + 1:]
            try:
                self.session = _session(ort, source, so, providers, provider_options)
            except Exception as e2:
                raise ModelLoadError(f"model: onnxruntime cannot load {path}: {type(e2).__name__}: "
                                     f"{str(e2).splitlines()[0][:300]}") from e2
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.providers = self.session.get_providers()
        missing = [p for p in providers if p != "CPUExecutionProvider" and p not in self.providers]
        if missing:  # onnxruntime-gpu without its CUDA libraries falls back to CPU quietly
            log.warning("onnxruntime: %s asked for %s but got %s", name, ", ".join(providers), ", ".join(self.providers))

    def dtype(self, name: str):
        return _NP.get(self.inputs[name].type, np.float32)

    def rank(self, name: str) -> int:
        return len(self.inputs[name].shape)

    def fixed_batch(self) -> int | None:
        """The batch a static graph was exported for (None when the batch axis is dynamic)."""
        for i in self.inputs.values():
            if i.name != "timestep" and i.shape and isinstance(i.shape[0], int):
                return i.shape[0]
        return None

    def run(self, feed: dict[str, np.ndarray], batched: tuple[str, ...]) -> list[np.ndarray]:
        b = self.fixed_batch()
        n = feed[batched[0]].shape[0]
        try:
            if b is None or b == n or n % b:
                return self.session.run(None, feed)
            # a static-batch graph: run the engine's batch in slices of the exported size
            parts = [self.session.run(None, {k: (v[s:s + b] if k in batched else v) for k, v in feed.items()})
                     for s in range(0, n, b)]
            return [np.concatenate(p) for p in zip(*parts)]
        except Exception as e:
            msg = str(e)
            if "dimension" in msg.lower() or "shape" in msg.lower():
                want = {k: i.shape for k, i in self.inputs.items()}
                got = {k: list(v.shape) for k, v in feed.items()}
                raise InvalidParameter("shape", got, f"the shapes {self.path} was exported for: {want} (export "
                                       "without --static, or with a --resolution/--batch range that covers it; "
                                       "sizes must divide by the UNet's down-sampling)") from None
            raise


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model, config):
        ort = _import_ort()
        paths = (getattr(model, "extra", None) or {}).get("onnx")
        if not paths:
            raise ModelLoadError(
                f"model: {model.name} is a PyTorch model; --backend onnxruntime runs an ONNX export folder: write "
                f"one with `fastsd export --model {model.name} --out DIR`, then pass --model DIR "
                "(in Python: fastsd.export.load_onnx_model(DIR))")
        for need in ("text_encoder", "unet", "vae_decoder"):
            if need not in paths:
                raise ModelLoadError(f"model: the export at {model.path} has no {need} graph")
        info = model.extra.get("export") or {}
        exported = info.get("dtype", config.dtype)
        if config.dtype != exported:
            raise InvalidParameter("dtype", config.dtype, f"{exported} (the dtype {model.path} was exported in; pass "
                                   f"--dtype {exported}, or re-export with --dtype {config.dtype})")
        self.export_dtype = exported
        self.export_info = info
        self.dtype = torch.float16 if exported == "fp16" else torch.float32
        self.device = torch.device("cpu")  # the engine's tensors; onnxruntime moves them to its provider
        self.folder = model.path
        self.configs = {c: dict(vars(getattr(model, c).config)) for c in ("unet", "text_encoder")}
        self.providers = choose_providers(ort, config.device)
        gpu = any(p in GPU_PROVIDERS for p in self.providers)
        threads = torch.get_num_threads()
        self.threads = threads
        profiles = trt_profiles(self.folder)
        self.graphs: dict[str, _Graph] = {}
        for comp in ("text_encoder", "unet", "vae_decoder"):
            p = paths[comp]
            path = p["gpu"] if gpu and p.get("gpu") else p["cpu"]
            providers, opts = session_providers(self.providers, comp, config.device, export_dtype=exported,
                                                folder=self.folder, profile=profiles.get(comp),
                                                optimized=is_optimized(info, comp, p))
            self.graphs[comp] = _Graph(ort, comp, path, providers, opts, threads)
        self.base_graphs = dict(self.graphs)  # the export's own weights; self.graphs runs the active LoRA set
        self.lora_sessions = None  # lora.SessionCache, made on the first LoRA set
        # optional, and opened on first use: only image-to-image and inpainting need it
        self._encoder_spec = (ort, paths["vae_encoder"], gpu, config, profiles.get("vae_encoder"),
                              is_optimized(info, "vae_encoder", paths["vae_encoder"])) \
            if "vae_encoder" in paths else None
        if gpu and all(g.providers == ["CPUExecutionProvider"] for g in self.graphs.values()):
            log.warning("onnxruntime: %s are available but every session fell back to CPUExecutionProvider "
                        "(CUDA libraries missing?)", ", ".join(p for p in self.providers if p in GPU_PROVIDERS))
        self.ort_version = ort.__version__

    # -- LoRA sets (lora.py) ------------------------------------------------------------------
    LORA_SESSION_SETS = 2  # LoRA sets whose sessions are kept (each holds its own copy of a UNet's weights)

    def lora_weights(self):
        """The weights LoRA sets are fused into (fastsd.lora): the export's initializers, replaced per session."""
        from ..onnx_lora import OnnxLoraWeights, SessionCache  # lazy: onnx graph surgery only for a LoRA set
        if self.lora_sessions is None:
            self.lora_sessions = SessionCache(self.LORA_SESSION_SETS)
        return OnnxLoraWeights(self, self.configs)

    def lora_graph_path(self, comp: str):
        return self.base_graphs[comp].path

    def use_lora_sessions(self, key: tuple, initializers: dict[str, dict[str, np.ndarray]], model_bytes) -> None:
        """Run the graphs of one LoRA set: sessions with `initializers` ({graph: {name: array}}) in place of the
        export's, made on first use and cached by `key`; an empty set runs the export's own sessions.
        model_bytes(graph, names): that graph with those initializers marked external."""
        def make():
            out = {}
            for comp, arrays in initializers.items():
                ort, name, path, providers, options, threads = self.base_graphs[comp].spec
                # TensorRT's engine cache is keyed by the graph, not its weights: a LoRA session builds its own
                options = [{**o, "trt_engine_cache_enable": "False"} if p == TRT else o
                           for p, o in zip(providers, options)]
                out[comp] = _Graph(ort, name, path, providers, options, threads, initializers=arrays,
                                   model_bytes=model_bytes(comp, list(arrays)))
            return out
        made = self.lora_sessions.get(key, make) if initializers else {}
        for comp, g in self.base_graphs.items():
            self.graphs[comp] = made.get(comp, g)

    # -- the three calls the engine makes -----------------------------------------------------------
    def prepare(self, batch: int, height: int, width: int, guided: bool) -> None:
        """Nothing to plan: ONNX Runtime manages its own memory (the torch backend slices and tiles)."""

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        g = self.graphs["text_encoder"]
        ids = input_ids.cpu().numpy().astype(g.dtype("input_ids"))
        return torch.from_numpy(np.ascontiguousarray(g.run({"input_ids": ids}, ("input_ids",))[0])).float()

    def unet(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
             class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """class_labels: the x4 upscaler's noise levels (its export's UNet graph takes them)."""
        g = self.graphs["unet"]
        t = float(timestep.item() if torch.is_tensor(timestep) else timestep)
        ts = np.asarray(t, dtype=g.dtype("timestep"))
        if g.rank("timestep") == 1:
            ts = ts.reshape(1)
        feed = {"sample": sample.detach().cpu().numpy().astype(g.dtype("sample"), copy=False), "timestep": ts,
                "encoder_hidden_states": encoder_hidden_states.detach().cpu().numpy().astype(
                    g.dtype("encoder_hidden_states"), copy=False)}
        batched = ("sample", "encoder_hidden_states")
        if class_labels is not None:
            feed["class_labels"] = class_labels.detach().cpu().numpy().astype(g.dtype("class_labels"), copy=False)
            batched += ("class_labels",)
        out = g.run(feed, batched)[0]
        return torch.from_numpy(np.ascontiguousarray(out)).float()

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> latent_parameters [B, 8, h, w] (mean and log-variance), as the export's
        vae_encoder graph gives them (and Optimum's img2img/inpaint pipelines read them)."""
        if "vae_encoder" not in self.graphs and self._encoder_spec is not None:
            # its own TensorRT profile (image-sized `sample`) and engine cache (trt_cache/vae_encoder), chosen
            # as for the other graphs: never the UNet's
            ort, p, gpu, config, profile, optimized = self._encoder_spec
            path = p["gpu"] if gpu and p.get("gpu") else p["cpu"]
            providers, opts = session_providers(self.providers, "vae_encoder", config.device,
                                                export_dtype=self.export_dtype, folder=self.folder,
                                                profile=profile, optimized=optimized)
            self.graphs["vae_encoder"] = _Graph(ort, "vae_encoder", path, providers, opts, self.threads)
        g = self.graphs.get("vae_encoder")
        if g is None:
            raise ModelLoadError(f"model: the export at {self.folder} has no vae_encoder graph, which image-to-image "
                                 "and inpainting need; export with --components text_encoder,unet,vae")
        x = image.detach().cpu().numpy().astype(g.dtype("sample"), copy=False)
        return torch.from_numpy(np.ascontiguousarray(g.run({"sample": x}, ("sample",))[0])).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        g = self.graphs["vae_decoder"]
        x = latents.detach().cpu().numpy().astype(g.dtype("latent_sample"), copy=False)
        return torch.from_numpy(np.ascontiguousarray(g.run({"latent_sample": x}, ("latent_sample",))[0])).float()

    def describe(self) -> dict:
        got = {k: g.providers for k, g in self.graphs.items()}
        on_gpu = any(p[0] in GPU_PROVIDERS for p in got.values())
        return {"backend": self.name, "device": "cuda" if on_gpu else "cpu", "dtype": self.export_dtype,
                "providers": got,
                "graphs": {k: os.path.relpath(g.path, self.folder) if self.folder else str(g.path)
                           for k, g in self.graphs.items()},
                "threads": self.threads, "onnxruntime": self.ort_version,
                **({"lora_sessions": self.lora_sessions.describe()} if self.lora_sessions else {})}
