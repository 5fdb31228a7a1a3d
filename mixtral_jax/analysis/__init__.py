"""Analysis: what the routers do, as in section 5 of the Mixtral paper.

routing.py   every token's chosen experts from the model's forward pass; shares,
             repeats between consecutive tokens, their table
figures.py   the figures (matplotlib, the `.[plots]` extra) and the whole report
cli.py       `python -m mixtral_jax.routing`
"""
