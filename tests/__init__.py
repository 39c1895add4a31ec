"""hugepaged's tests (a package: pytest puts the repository root on sys.path, where the
shared kit, `kit/`, lives)."""
