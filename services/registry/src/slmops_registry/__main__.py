from slmops_registry.app import main

main()
