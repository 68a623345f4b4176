"""Exchange Web Services: our own asyncio GetStreamingEvents client (soap, httpauth, stream) beside exchangelib."""
