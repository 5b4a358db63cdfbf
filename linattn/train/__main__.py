"""``python -m linattn.train train CONFIG`` (the same as ``linattn train CONFIG``)."""
import sys

from .cli import main

sys.exit(main())
