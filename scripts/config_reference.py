"""Print the config reference table of README.md from the typed config (keys, defaults, help)."""

from gifcli.config import reference


def main() -> None:
    print("| key | default | meaning |")
    print("|---|---|---|")
    for key, default, help in reference():
        cell = f"`{default}`" if default else ""
        meaning = help.replace("|", "\\|")
        print(f"| `{key}` | {cell} | {meaning} |")


if __name__ == "__main__":
    main()
