"""DigiVault Conversations service: the aiohttp application and its processes."""
