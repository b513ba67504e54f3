import os
import sys

# tests/ holds shared helpers (reference.py, cases.py) imported by name
sys.path.insert(0, os.path.dirname(__file__))
