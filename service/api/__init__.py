"""HTTP in, HTTP out: the aiohttp app factory, middlewares, handlers, request bodies, probes,
bearer-token auth and the OpenAPI document. Handlers call the domain in `service.conversations`;
nothing below this package imports from it."""
