"""``python -m dhdnn`` runs the CLI (also what torchrun starts on every rank)."""
from .cli import run

if __name__ == "__main__":
    run()
