// Command rampart-kustomize renders a kustomization as `kubectl kustomize
// DIR` does (it is the same library, sigs.k8s.io/kustomize/api's krusty),
// from the local disk only: no remote resources, no plugins.
//
//	rampart-kustomize DIR
//
// Prints the rendered YAML on stdout; exits 1 with the error on stderr.
package main

import (
	"fmt"
	"os"

	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: rampart-kustomize DIR")
		os.Exit(2)
	}
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	resources, err := k.Run(filesys.MakeFsOnDisk(), os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "rampart-kustomize:", err)
		os.Exit(1)
	}
	out, err := resources.AsYaml()
	if err != nil {
		fmt.Fprintln(os.Stderr, "rampart-kustomize:", err)
		os.Exit(1)
	}
	os.Stdout.Write(out)
}
