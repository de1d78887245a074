"""Regenerate the configuration tables of docs/configuration.md from the schemas (and the registries' sections
in them).

    python scripts/config_reference.py            # rewrite the tables in docs/configuration.md
    python scripts/config_reference.py --check    # exit 1 when the page is out of date (the tests run this check)

Each table sits between `<!-- config:NAME -->` and `<!-- /config:NAME -->` in docs/configuration.md. Run it after
adding or changing a config key, a KD method, an agent, a strategy or a gan_vae loss term: the schema is composed
from the registries, so their sections appear in the tables with their ranges and help.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PAGE = ROOT / "docs" / "configuration.md"


def tables() -> dict[str, str]:
    """NAME -> the markdown table of that program's keys (train_student_rl's: only the keys it adds)."""
    from common.config import config_markdown
    from common.registry import compose_schema
    from engine.schema import Config
    from engine.rl_schema import RLConfig
    from gan_vae.continual import ContinualConfig
    base = compose_schema(Config)
    return {"train_student": config_markdown(base),
            "train_student_rl": config_markdown(compose_schema(RLConfig), base=base),
            "gan_vae": config_markdown(compose_schema(ContinualConfig))}


def render(text: str) -> str:
    for name, table in tables().items():
        pattern = re.compile(rf"(<!-- config:{name} -->\n).*?(\n<!-- /config:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"docs/configuration.md has no <!-- config:{name} --> ... <!-- /config:{name} --> block")
        text = pattern.sub(lambda m: m.group(1) + table + m.group(2), text)
    return text


def main(argv: list[str]) -> int:
    current = PAGE.read_text()
    wanted = render(current)
    if "--check" in argv:
        if wanted != current:
            print("docs/configuration.md's configuration tables are out of date: "
                  "run `python scripts/config_reference.py`")
            return 1
        return 0
    if wanted != current:
        PAGE.write_text(wanted)
        print("docs/configuration.md: configuration tables regenerated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
