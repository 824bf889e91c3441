"""The `accelerate launch` command line of one machine of a training.

Every training runs this way, one process or many: accelerate sets up the process group
(torchrun's static rendezvous for several processes or machines) and workers.training runs in
each process. Only the machine rank differs between the machines of one training, so the job
stores the rest (launch.json) and `python -m workers.trainer.job join` rebuilds it elsewhere.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from service.config import Settings

# DDP on CPU (gloo) or N GPUs (nccl): what several processes use when no config file is given.
DDP_CONFIG = Path(__file__).resolve().parents[1] / "accelerate" / "ddp_cpu.yaml"


@dataclass(frozen=True)
class Launch:
    """How a training is launched; the same on every machine of it."""

    spec_path: str
    processes: int | None  # per machine; None: the config file's (else 1)
    machines: int
    main_address: str | None
    main_port: int | None
    config_file: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Launch:
        return cls(spec_path=str(d["spec_path"]), processes=d.get("processes"),
                   machines=int(d.get("machines") or 1), main_address=d.get("main_address"),
                   main_port=d.get("main_port"), config_file=d.get("config_file"))

    def is_distributed(self) -> bool:
        return self.machines > 1 or (self.processes or 1) > 1 or self.config_file is not None


def plan_launch(settings: Settings, spec_path: Path, free_port: int | None) -> Launch:
    """The launch the settings ask for (free_port: used when several processes need a
    rendezvous port and none is configured)."""
    processes = settings.train_processes
    config = settings.train_accelerate_config
    if config is None and (processes or 1) * settings.train_machines > 1:
        config = DDP_CONFIG
    if settings.train_machines > 1 and not settings.train_main_address:
        raise ValueError("FLYWHEEL_TRAIN_MACHINES > 1 needs FLYWHEEL_TRAIN_MAIN_ADDRESS "
                         "(rank 0's address the other machines reach)")
    if settings.train_machines > 1 and settings.train_main_port is None:
        raise ValueError("FLYWHEEL_TRAIN_MACHINES > 1 needs FLYWHEEL_TRAIN_MAIN_PORT "
                         "(the port the other machines join on)")
    port = settings.train_main_port or free_port
    return Launch(spec_path=str(spec_path), processes=processes, machines=settings.train_machines,
                  main_address=settings.train_main_address, main_port=port,
                  config_file=str(config) if config else None)


def accelerate_argv(launch: Launch, machine_rank: int = 0) -> list[str]:
    """argv of `accelerate launch ... -m workers.training --spec SPEC` for one machine."""
    if not 0 <= machine_rank < launch.machines:
        raise ValueError(f"machine rank {machine_rank} outside 0..{launch.machines - 1}")
    argv = [sys.executable, "-m", "accelerate.commands.launch"]
    if launch.config_file:
        argv += ["--config_file", launch.config_file]
    else:  # one plain process: say so, or accelerate warns about every value it defaulted
        argv += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no"]
    if launch.config_file and (launch.processes is not None or launch.machines > 1):
        # accelerate counts processes over all machines.
        argv += ["--num_processes", str((launch.processes or 1) * launch.machines)]
    if launch.machines > 1:
        argv += ["--num_machines", str(launch.machines), "--machine_rank", str(machine_rank),
                 "--main_process_ip", str(launch.main_address), "--rdzv_backend", "static",
                 "--same_network"]
    if launch.main_port is not None and launch.is_distributed():
        argv += ["--main_process_port", str(launch.main_port)]
    return [*argv, "-m", "workers.training", "--spec", launch.spec_path]
