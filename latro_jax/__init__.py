"""latro_jax: LaTRO and MRT on JAX/Flax."""
