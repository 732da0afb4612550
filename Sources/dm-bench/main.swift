// The entry point: everything else is in DMBench.swift and the figure files.
import ArgumentParser

DMBench.main()
