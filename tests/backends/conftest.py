"""Fixtures for the backend tests: an onnxruntime that pretends to have GPU providers."""
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
