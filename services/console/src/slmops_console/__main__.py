from slmops_console.app import main

main()
