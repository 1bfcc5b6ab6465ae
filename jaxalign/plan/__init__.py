"""Compile any stage's steps for a TPU slice from abstract inputs: memory per chip, flops, collectives
and a roofline time, from the TPU compiler (libtpu) on any machine (`jaxalign plan`, docs/tpu.md).

    chips.py       the chips' published figures, slice names -> compile-only devices
    steps.py       Step (a jitted function + abstract arguments) -> StepPlan (memory, cost, roofline)
    hlo.py         flops, bytes and collectives of an optimised HLO module, loops counted
    flops.py       model FLOPs of a step's passes (for MFU)
    supervised.py  the train / eval steps of SFT, reward / cost, DPO family, moderation
    rl.py          the rollout / scoring / update steps of an RL iteration from abstract roles
    search.py      the smallest slice (mesh, RL minibatches) on which every step fits
    report.py      the plan as text / JSON, the launch command

The config-reading part (config -> these typed inputs) is jaxalign/stages/planning.py.
"""
