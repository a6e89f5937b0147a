"""slmops console: an operations console in the browser, served on 127.0.0.1.

Pages are rendered on the server from the platform's own APIs, called with the signed-in
operator's token (so every API's authorization holds in the console too), and kept live with
server-sent events fed by the platform's events on NATS.
"""
