# Preset for online serving on a GPU (many clients at once, the OpenAI door), not the judge's
# one big batch: vLLM's own compilation (Inductor) and `vllm serve`'s scheduler defaults, in
# place of the eager backend and offline defaults chosen for a short cold start. Fills only
# what the environment leaves unset. Use: ./build.sh serve docker/online.sh (LLM_PRESET in
# the images). What it gains and costs, measured: docs/performance.md, "The online preset".
if [ -z "${VLLM_COMPILATION_CONFIG:-}" ]; then VLLM_COMPILATION_CONFIG='{}'; fi
: "${VLLM_SCHEDULER_DEFAULTS:=serve}"
export VLLM_COMPILATION_CONFIG VLLM_SCHEDULER_DEFAULTS
