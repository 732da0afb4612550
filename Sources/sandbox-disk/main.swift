// The entry point: SandboxDisk.swift has the command tree and the exit-status mapping.

runSandboxDisk()
