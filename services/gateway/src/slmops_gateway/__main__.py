from slmops_gateway.app import main

main()
