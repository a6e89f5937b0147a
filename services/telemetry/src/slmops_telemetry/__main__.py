from slmops_telemetry.app import main

main()
