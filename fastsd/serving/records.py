"""MII's side of a deployment: MII imported quietly, the deployment records MII's client finds by name
(one score file per task: NAME for text-to-image, NAME-inpaint for image-to-image and inpainting, both
naming the same servers), and the replicas laid out as MII lays them out. MII is imported only by the
functions that need it, so `fastsd status`/`stop` stay light."""
from __future__ import annotations

import os
import socket
from pathlib import Path

from .errors import ServingError
from .ports import LOOPBACK, connect_host
from .spec import ReplicaPlacement

TEXT_TO_IMAGE = "text-to-image"  # MII's TaskType.TEXT2IMG: the Txt2ImgReply RPC
IMAGE_TASK = "text-to-image-inpainting"  # MII's TaskType.INPAINTING: image-to-image and inpainting (InpaintingReply)
TASKS = (TEXT_TO_IMAGE, IMAGE_TASK)
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}


def record_name(name: str, task: str = TEXT_TO_IMAGE) -> str:
    """The MII deployment name under which deployment NAME serves `task`: MII's client takes the task
    from the record it finds by name, so each task needs a record of its own."""
    if task == TEXT_TO_IMAGE:
        return name
    if task == IMAGE_TASK:
        return name + "-inpaint"
    raise ValueError(f"task {task!r}: a deployment serves {', '.join(TASKS)}")


def import_mii():
    """MII, without DeepSpeed's start-up notices on a user's terminal: on a machine without CUDA,
    DS_ACCELERATOR=cpu says what DeepSpeed would otherwise guess (and warn about), and its
    deprecation notices about MII's own config fields are silenced."""
    import logging

    import torch
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    import mii
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    return mii


def _is_local(host: str) -> bool:
    return host in LOCAL_HOSTS or host in (socket.gethostname(), socket.getfqdn())


def visible_gpus() -> list[str]:
    """The GPUs this process sees, named as a child's CUDA_VISIBLE_DEVICES takes them: the entries of this
    process's own CUDA_VISIBLE_DEVICES when it sets one (so replica placement keeps the operator's mask)."""
    import torch  # lazy: only `fastsd serve` on CUDA without --gpus asks, never the light processes
    n = torch.cuda.device_count()
    mask = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return mask[:n] if mask else [str(i) for i in range(n)]


def plan_replicas(name: str, ddir: Path, replicas: int, port: int, host: str, hostfile: str | None,
                  gpus: list[int] | None, model: str, on_gpu: bool = True) -> tuple[list[ReplicaPlacement], object]:
    """Replica hosts and ports as MII lays them out (load balancer on `port`, replica i on port+1+i,
    hosts and slots from MII's hostfile), and MII's deployment record for them. A hostfile's slots
    are GPU indices only when the engine runs on CUDA (`on_gpu`); on CPU they only count replicas. On CUDA
    without `gpus` or a hostfile, replica i runs on visible GPU i mod n (the per-device memory budget is
    shared by the replicas placed on it: replica.build_sizer)."""
    import_mii()
    from mii.legacy.config import MIIConfig, ModelConfig
    if gpus is None and hostfile is None and on_gpu:
        gpus = visible_gpus() or None  # spread over every GPU this process sees, not all on GPU 0
    if hostfile is None:
        hostfile = str(ddir / "hostfile")
        Path(hostfile).write_text(f"localhost slots={replicas}\n")
    elif not Path(hostfile).is_file():
        raise ServingError(f"hostfile {hostfile}: no such file")
    try:
        cfg = MIIConfig(deployment_name=record_name(name), deployment_type="local", port_number=port,
                        hostfile=hostfile, model_conf=ModelConfig(model=model, task=TEXT_TO_IMAGE,
                                                                  skip_model_check=True, enable_deepspeed=False,
                                                                  replica_num=replicas))
        cfg.generate_replica_configs()
    except (ValueError, AssertionError) as e:
        raise ServingError(f"cannot place {replicas} replica(s) with hostfile {hostfile}: {e}") from None
    out = []
    for i, rc in enumerate(cfg.model_conf.replica_configs):
        local = _is_local(rc.hostname)
        if not local and host in LOOPBACK:
            raise ServingError(f"replica {i} is placed on host {rc.hostname} by the hostfile; remote replicas need "
                               "--host set to an address the other hosts reach (and a private network: MII's gRPC "
                               "has no authentication)")
        cvd = None
        if gpus:
            cvd = gpus[i % len(gpus)]
        elif hostfile != str(ddir / "hostfile") and rc.gpu_indices and on_gpu:
            cvd = ",".join(map(str, rc.gpu_indices))  # MII's slot -> GPU index, as its launcher does
        out.append(ReplicaPlacement(index=i, host=connect_host(host) if local else rc.hostname, local=local,
                                    bind=host if local else "0.0.0.0", port=rc.tensor_parallel_ports[0],
                                    cuda_visible_devices=cvd))
    return out, cfg


def write_records(mii_config) -> None:
    """MII's deployment records, one per task, all naming the same servers: what
    `mii_query_handle(record_name(NAME, task))` reads."""
    from mii.legacy.models.score import create_score_file
    for task in TASKS:
        cfg = mii_config.model_copy(deep=True) if hasattr(mii_config, "model_copy") else mii_config.copy(deep=True)
        cfg.deployment_name = record_name(mii_config.deployment_name, task)
        cfg.model_conf.task = task
        create_score_file(cfg)


def remove_records(root: Path, name: str) -> None:
    """Deletes the records, so no client finds a deployment that is gone (the folders stay: logs)."""
    for task in TASKS:
        (root / record_name(name, task) / "score.py").unlink(missing_ok=True)
