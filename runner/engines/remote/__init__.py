"""What engine=openai needs to talk to a server it does not own: the client with its retries, the
faults sorted by cause, client-side rate limits, and the server process it starts when asked."""
