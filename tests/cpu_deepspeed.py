"""Lightning's DeepSpeedStrategy on CPU, for tests only: the real strategy minus its CUDA-only checks.

DeepSpeed itself trains ZeRO stages 1-3 on CPU with gloo; Lightning refuses the CPU accelerator and validates
CUDA device indices. This subclass skips those two checks and gives `deepspeed.initialize` the local rank as
the device rank. Use it from the CLI with `--trainer.strategy tests.cpu_deepspeed.CPUDeepSpeedStrategy`.
"""

import argparse

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeedStrategy that accepts `accelerator: cpu` (gloo backend)."""

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        params = [p for p in model.parameters() if p.requires_grad]
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=params,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer
