"""Fixtures for the backend tests: an onnxruntime that pretends to have GPU providers, and a random LoRA on
every weight layout an ONNX export stores (for the onnxruntime and openvino LoRA tests)."""
import os

import pytest


class _PretendGpuSession:
    """onnxruntime.InferenceSession on the CPU provider that reports the providers it was asked for (this
    onnxruntime build has no GPU provider), recording what each session was given."""
    made: list = []
    fail_with_tensorrt = False
    ignores_enable_fallback = False  # onnxruntime 1.18-1.22: its own retry runs whatever enable_fallback says

    def __init__(self, path, so=None, providers=None, provider_options=None, **kwargs):
        for name, opts in zip(providers, provider_options):
            if name == "TensorrtExecutionProvider" and opts.get("trt_engine_cache_enable") == "True":
                # onnxruntime's TensorRT provider creates only the last level of this path
                assert os.path.isdir(opts["trt_engine_cache_path"]), opts["trt_engine_cache_path"]
        self.made.append({"path": str(path), "providers": list(providers), "options": list(provider_options),
                          "kwargs": kwargs})
        self._options = {n: {k: str(v) for k, v in o.items()} for n, o in zip(providers, provider_options)}
        if self.fail_with_tensorrt and "TensorrtExecutionProvider" in providers:
            if not self.ignores_enable_fallback:
                raise RuntimeError("TensorRT EP failed to create engine from network")
            # what onnxruntime 1.18-1.22 do: retry on CUDA and CPU with no provider options (device 0)
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            self._options = {"CUDAExecutionProvider": {"device_id": "0"}, "CPUExecutionProvider": {}}
        # model.gpu.onnx holds fused ops with no CPU kernel: its CPU-safe sibling has the same inputs
        self._real = _REAL_SESSION(str(path).replace("model.gpu.onnx", "model.onnx"), so,
                                   providers=["CPUExecutionProvider"])
        self._providers = list(providers)

    def get_providers(self):
        return self._providers

    def get_provider_options(self):
        return {n: dict(self._options.get(n, {})) for n in self._providers}

    def __getattr__(self, name):
        return getattr(self._real, name)


_REAL_SESSION = None


@pytest.fixture
def pretend_gpu(monkeypatch):
    global _REAL_SESSION
    import onnxruntime as ort
    _REAL_SESSION = ort.InferenceSession
    _PretendGpuSession.made = []
    _PretendGpuSession.fail_with_tensorrt = False
    _PretendGpuSession.ignores_enable_fallback = False
    monkeypatch.delenv("FASTSD_ORT_PROVIDERS", raising=False)
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", _PretendGpuSession)
    return _PretendGpuSession


# linear (MatMul, weight transposed), Gemm (time_emb_proj), 1x1 and 3x3 conv, and text-encoder layers
LORA_UNET = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj", "ff.net.2")
LORA_TEXT = ("q_proj", "out_proj", "fc1")


@pytest.fixture(scope="session")
def every_layout_lora(_tiny, tmp_path_factory):
    """A rank-4 random LoRA (alpha 2, seed 1) in diffusers' layout on the tiny model's LORA_UNET/LORA_TEXT layers."""
    from fastsd.lora_files import random_factors, save_diffusers_layout
    return save_diffusers_layout(random_factors(_tiny, rank=4, seed=1, unet_targets=LORA_UNET, text_targets=LORA_TEXT),
                                 tmp_path_factory.mktemp("layout-lora") / "a.safetensors", alpha=2.0)
