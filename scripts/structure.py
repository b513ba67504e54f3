"""Structure figures of the code base at a git revision: longest function, largest class, imports between folders,
README length.

    python scripts/structure.py              # the working tree
    python scripts/structure.py --rev HEAD~5 # a commit (read with git show, nothing checked out)

Cross-folder imports are import statements (function-local ones included) in one of the package's folders that name
a module of another folder; ``edge_qlora.constants`` is counted apart, as the shared bottom layer.
"""

import argparse
import ast
import subprocess
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"edge_qlora": "edge_qlora", "rtl": "edge_qlora.rtl", "golden": "edge_qlora.golden", "sim": "edge_qlora.sim",
           "boards": "edge_qlora.boards"}


def _files(rev):
    if rev is None:
        return {str(p.relative_to(ROOT)): p.read_text() for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")}
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", rev, *FOLDERS],
                           capture_output=True, text=True, check=True).stdout.split()
    return {n: subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{n}"], capture_output=True, text=True,
                              check=True).stdout for n in names if n.endswith(".py")}


def _readme(rev):
    if rev is None:
        return (ROOT / "README.md").read_text()
    return subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:README.md"], capture_output=True, text=True,
                          check=True).stdout


def _folder_of(module):
    parts = module.split(".")
    if parts[0] != "edge_qlora":
        return None
    if len(parts) > 1:
        for folder, package in FOLDERS.items():
            if package != "edge_qlora" and module.startswith(package):
                return folder
        if parts[1] == "constants":
            return "constants"
    return "edge_qlora"


def measure(rev=None):
    longest, largest = (0, ""), (0, "")
    imports = Counter()
    for name, text in sorted(_files(rev).items()):
        folder = name.split("/")[0]
        package = FOLDERS[folder]
        sub = name.split("/")[1:-1]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                longest = max(longest, (node.end_lineno - node.lineno + 1, f"{name}:{node.name}"))
            elif isinstance(node, ast.ClassDef):
                largest = max(largest, (node.end_lineno - node.lineno + 1, f"{name}:{node.name}"))
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = (package.split(".") + sub)[:len(package.split(".") + sub) - node.level + 1]
                    targets.append(".".join(base + ([node.module] if node.module else [])))
                else:
                    targets.append(node.module or "")
            elif isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
            for target in targets:
                other = _folder_of(target)
                if other and other != folder:
                    imports["constants" if other == "constants" else f"{folder} -> {other}"] += 1
    return {
        "longest function": f"{longest[0]} lines ({longest[1]})",
        "largest class": f"{largest[0]} lines ({largest[1]})",
        "imports of constants": imports.pop("constants", 0),
        "cross-folder imports": f"{sum(imports.values())} ({', '.join(f'{k}: {v}' for k, v in sorted(imports.items()))})",
        "README lines": len(_readme(rev).splitlines()),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="git revision (default: the working tree)")
    args = parser.parse_args()
    for key, value in measure(args.rev).items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
