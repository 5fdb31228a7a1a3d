"""Planning: will a model fit on a TPU slice, and how fast could it run, told by the
TPU compiler itself (CLI: tools/plan.py).

    topology.py   TPU generations and slices: chips, memory, abstract devices
    plan.py       the project's steps compiled for a slice with abstract arrays:
                  memory per chip, cost twins, the nearest plan that fits
    report.py     a plan as text, its verdict, a row of docs/tpu-plan.md's table
"""
