"""The `$n` parameters of a statement built from parts (the row, its outbox row, an idempotency
key's claim and answer): each part takes the next numbers by name, so that no part counts the
parameters of another."""


class Parameters:
    """Hands out a statement's `$n` placeholders in order. The statement's arguments are then
    each part's values, in the order the parts took their placeholders."""

    def __init__(self) -> None:
        self.count = 0

    def take(self, *names: str) -> dict[str, str]:
        """The next placeholders, one for each of `names` (in that order), by name."""
        first = self.count + 1
        self.count += len(names)
        return {name: f"${number}" for number, name in enumerate(names, first)}
