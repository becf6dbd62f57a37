"""Framework-free logic of the LLM service: routing, chat formatting, clean-up, engines.

The Triton models under model_repository/*/1/model.py are thin adapters over this
package; nothing here imports Triton, so it is unit-tested without a server.
"""
