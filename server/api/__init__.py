"""The OpenAI HTTP layer: protocol models, routes, errors, server-sent events, the response store,
the reasoning split and the Quart app. It drives `server.engine` and never touches tensors."""
