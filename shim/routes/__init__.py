"""The shim's routes, one module-level router per audience, all reaching `ShimState`
through `shim.state.shim_state(request)`:

- `judge`: `GET /` (health) and `POST /predict`, the evaluation client's contract;
- `admin`: `GET /info`, `GET/POST /system_prompt` (the POST behind SHIM_ADMIN_TOKEN) and
  `GET /metrics`;
- `openai`: `/v1/models`, `/v1/chat/completions`, `/v1/completions`;
- `ui`: the web page `GET /ui` and the routing explainer `POST /explain`.

Bodies are read by `shim.bodies.parse_body`; every error is a `shim.errors.ApiError`.
"""
