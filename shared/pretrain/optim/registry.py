"""The optimizer registry of the pre-training harness: name -> "module:Class", imported lazily.

Adding an optimizer = its file (a ``torch.optim.Optimizer`` that also derives from
``shared.pretrain.optim.base.HarnessOptimizer``) + one line here. A paper's own optimizer lives in its folder; the
shared ones (AdamW, GaLore: every paper's baselines) live in ``shared/pretrain/optim/``.

DVC stages list the entries they use as params (``../../shared/pretrain/optim/registry.py: [OPTIMIZERS.adamw, ...]``,
DVC reads Python params files), so a new line here leaves the other papers' locks untouched.
"""
OPTIMIZERS = {
    "adamw": "shared.pretrain.optim.adamw:AdamW",
    "galore": "shared.pretrain.optim.galore:GaLoreAdamW",
    "frugal": "papers.frugal.optimizer:FRUGAL",
    "fira": "papers.fira.optimizer:FiraAdamW",
    "fira_pytorch_optimizer": "papers.fira.peer:PytorchOptimizerFira",
    "sinkgd": "papers.sinkgd.optimizer:SinkGD",
    "swan": "papers.sinkgd.optimizer:SWAN",
}
