"""Framework-free logic of the LLM service: the text stages (routing, chat formatting,
clean-up, sampling), the settings, the tensor contract, and the engine (`engine/`).

The Triton models under model_repository/*/1/model.py are thin adapters over this
package; nothing here imports Triton, so it is unit-tested without a server.
"""
